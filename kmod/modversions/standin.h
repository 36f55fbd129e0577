/* kmod/modversions/standin.h: the interface both stand-ins are compiled with. */
#ifndef KVC_STANDIN_H
#define KVC_STANDIN_H

struct kvc_standin_gpu_info {
    int id;
#if KVC_STANDIN_LAYOUT == 2
    long added_by_an_upgrade;
#endif
};

int kvcStandinRegisterGpu(struct kvc_standin_gpu_info *info);

#endif
