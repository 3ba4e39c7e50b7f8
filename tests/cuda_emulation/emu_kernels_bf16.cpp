#define EMU_KERNEL_T __nv_bfloat16
#include "emu_kernels.inc"
