/*
 * kmod/modversions/nvidia/nvidia.c: a stand-in for NVIDIA's nvidia.ko in driver-check's
 * "modversions" check (kmod/analyze.sh): built by the real kbuild against the checked kernel
 * headers, it exports a function the way nvidia.ko exports nvUvmInterface*, taking a struct whose
 * layout KVC_STANDIN_LAYOUT changes, as a driver upgrade changes UvmGpu* structs. Never loaded.
 */
#include <linux/module.h>

#include "../standin.h"

int kvcStandinRegisterGpu(struct kvc_standin_gpu_info *info)
{
    return info->id;
}
EXPORT_SYMBOL(kvcStandinRegisterGpu);

MODULE_LICENSE("Dual MIT/GPL");
MODULE_VERSION("0.0.1");
