/* A stand-in libcuda.so.1 for timing the host side of Triton launches without a GPU.
 *
 * Triton's generated launcher (a small C module built per kernel signature) links against
 * libcuda.so.1 and calls the driver entry points below. Each one here succeeds and does nothing,
 * except that launches are counted, so `step()` runs its real host path up to the driver call.
 */
#include <stdint.h>

typedef int CUresult;
static int the_context;
volatile unsigned long long standin_launches = 0;

CUresult cuGetErrorString(CUresult err, const char **msg) { (void)err; *msg = "stand-in"; return 0; }
CUresult cuPointerGetAttribute(void *out, int attr, unsigned long long ptr) {
    (void)attr; *(uint64_t *)out = ptr; return 0;
}
CUresult cuCtxGetCurrent(void **ctx) { *ctx = &the_context; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { (void)ctx; return 0; }
CUresult cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { (void)dev; *ctx = &the_context; return 0; }
CUresult cuFuncSetAttribute(void *fn, int attr, int value) { (void)fn; (void)attr; (void)value; return 0; }
CUresult cuLaunchKernelEx(const void *config, void *fn, void **params, void **extra) {
    (void)config; (void)fn; (void)params; (void)extra; standin_launches++; return 0;
}
