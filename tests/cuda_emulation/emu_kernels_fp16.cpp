#define EMU_KERNEL_T __half
#include "emu_kernels.inc"
