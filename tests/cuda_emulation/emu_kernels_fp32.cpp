#define EMU_KERNEL_T float
#include "emu_kernels.inc"
