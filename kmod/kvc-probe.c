/*
 * kmod/kvc-probe.c: the installer's smoke test. Asks the nvidia-uvm module behind a device node
 * (default /dev/nvidia-uvm) UVM_KVC_QUERY, which needs no UVM_INITIALIZE, and checks that it
 * answers as the KVC-patched module: syscall 0, rmStatus NV_OK, the magic "UVMKVC01" and the ABI
 * version of driver-patch/include/uvm_kvc_ioctl.h. A stock module answers EINVAL or ENOSYS.
 *
 *   kvc-probe [DEVICE]     exit 0 and one "kvc-probe: ok ..." line, or 1 and why not; 2: usage
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "uvm_kvc_ioctl.h"

int main(int argc, char **argv)
{
    const char *dev = argc > 1 ? argv[1] : "/dev/nvidia-uvm";
    UVM_KVC_QUERY_PARAMS params;
    int fd, rc;

    if (argc > 2) {
        fprintf(stderr, "usage: kvc-probe [DEVICE]\n");
        return 2;
    }
    fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "kvc-probe: cannot open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    memset(&params, 0, sizeof(params));
    params.version = UVM_KVC_ABI_VERSION;
    rc = ioctl(fd, UVM_KVC_QUERY, &params);
    if (rc != 0) {
        int err = errno;

        fprintf(stderr, "kvc-probe: UVM_KVC_QUERY on %s failed: %s%s\n", dev, strerror(err),
                err == EINVAL || err == ENOSYS ? " (the stock nvidia-uvm answers so)" : "");
        close(fd);
        return 1;
    }
    close(fd);
    if (params.rmStatus != 0) {
        fprintf(stderr, "kvc-probe: UVM_KVC_QUERY on %s returned rmStatus 0x%x\n", dev,
                (unsigned)params.rmStatus);
        return 1;
    }
    if (params.magic != UVM_KVC_MAGIC) {
        fprintf(stderr, "kvc-probe: UVM_KVC_QUERY on %s answered magic 0x%llx, not 0x%llx\n", dev,
                (unsigned long long)params.magic, (unsigned long long)UVM_KVC_MAGIC);
        return 1;
    }
    printf("kvc-probe: ok: %s answers UVM_KVC_QUERY (ABI version %u, page sizes 0x%llx)\n", dev,
           (unsigned)UVM_KVC_ABI_VERSION, (unsigned long long)params.supportedPageSizes);
    return 0;
}
