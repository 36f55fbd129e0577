/*
 * tests/stubs/install/fake_uvm_ioctl.c: LD_PRELOAD for the installer tests. UVM_KVC_QUERY on the
 * sandbox's $KVC_SYSROOT/dev/nvidia-uvm is answered as the module "loaded" in the sandbox
 * ($KVC_SYSROOT/sys/module/nvidia_uvm) would: the magic when it is a -kvc module, a wrong magic
 * when its kvctest is "broken", ENOSYS (a stock 570+ module) otherwise. Every other ioctl goes
 * to libc's.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uvm_kvc_ioctl.h"

static int read_line(const char *root, const char *rel, char *buf, size_t size)
{
    char path[PATH_MAX];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", root, rel);
    f = fopen(path, "r");
    if (!f)
        return -1;
    if (!fgets(buf, (int)size, f))
        buf[0] = '\0';
    fclose(f);
    buf[strcspn(buf, "\n")] = '\0';
    return 0;
}

static int is_sandbox_uvm(const char *root, int fd)
{
    char link[64], target[PATH_MAX], want[PATH_MAX];
    ssize_t n;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof(target) - 1);
    if (n < 0)
        return 0;
    target[n] = '\0';
    snprintf(want, sizeof(want), "%s/dev/nvidia-uvm", root);
    return strcmp(target, want) == 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real_ioctl)(int, unsigned long, ...);
    const char *root = getenv("KVC_SYSROOT");
    char version[256], kvctest[256];
    UVM_KVC_QUERY_PARAMS *params;
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (request == UVM_KVC_QUERY && root && is_sandbox_uvm(root, fd)) {
        params = arg;
        if (read_line(root, "sys/module/nvidia_uvm/version", version, sizeof(version)) != 0) {
            errno = ENXIO;
            return -1;
        }
        if (!strstr(version, "-kvc")) {
            errno = ENOSYS;
            return -1;
        }
        if (read_line(root, "sys/module/nvidia_uvm/.kvctest", kvctest, sizeof(kvctest)) != 0)
            kvctest[0] = '\0';
        params->magic = strcmp(kvctest, "broken") == 0 ? 0 : UVM_KVC_MAGIC;
        params->supportedPageSizes = UVM_KVC_SUPPORTED_PAGE_SIZES;
        params->rmStatus = 0;
        return 0;
    }
    if (!real_ioctl)
        real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real_ioctl(fd, request, arg);
}
