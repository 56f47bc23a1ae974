// fastsched._cpu_ext: the adam_fused variants of float32 parameters (fused.h says why apart)
#include "fused.h"

FS_FUSED_WM_F32(template)
