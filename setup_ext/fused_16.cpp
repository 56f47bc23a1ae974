// fastsched._cpu_ext: the adam_fused variants of bfloat16 and float16 parameters (fused.h says
// why apart)
#include "fused.h"

FS_FUSED_WM_16(template)
