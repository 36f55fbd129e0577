/*
 * kmod/modversions/uvm/kvc_standin_uvm.c: the stand-in for nvidia-uvm.ko in driver-check's
 * "modversions" check: uses the stand-in nvidia.ko's export, built with KBUILD_EXTRA_SYMBOLS
 * from kmod/kvc-module.sh symvers (and no KBUILD_MODPOST_WARN), as install-driver builds the
 * patched nvidia-uvm.ko. Never loaded.
 */
#include <linux/module.h>

#include "../standin.h"

static int __init kvc_standin_uvm_init(void)
{
    struct kvc_standin_gpu_info info = { .id = 0 };

    return kvcStandinRegisterGpu(&info);
}
module_init(kvc_standin_uvm_init);

MODULE_LICENSE("Dual MIT/GPL");
