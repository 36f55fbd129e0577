#include "harness_uvm.h" /* driver-patch/harness: stand-in for the kernel/UVM header of this name */
