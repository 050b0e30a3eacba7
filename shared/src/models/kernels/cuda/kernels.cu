// GPU kernels for our own layers (issue 20), compiled to PTX by shared/build.rs with nvcc
// when the crate is built with the `cuda` feature, and loaded by kernels/gpu.rs.
//
// Each one computes what its CPU kernel computes, in the same order: the depthwise sum
// starts at the bias and adds the k*k taps row by row (a tap in the padding adds
// weight * 0, as the CPU's zero-padded phase planes do), the epilogue adds bias + residual
// to the value. Multiplies and adds are rounded separately (__fmul_rn, __fadd_rn, never
// contracted to FMA), so a GPU result equals the CPU's bit for bit. One thread per output
// value: no atomics, no reduction across threads, so the same input gives the same bits on
// every run.

extern "C" __global__ void shoplens_depthwise_f32(
    const float* __restrict__ x,       // [n, c, h, w]
    const float* __restrict__ weight,  // [c, k, k], BatchNorm folded
    const float* __restrict__ bias,    // [c]
    float* __restrict__ y,             // [n, c, ho, wo]
    unsigned int n, unsigned int c, unsigned int h, unsigned int w,
    unsigned int ho, unsigned int wo, unsigned int k, unsigned int stride,
    unsigned int pad_top, unsigned int pad_left, int relu6)
{
    const size_t total = (size_t)n * c * ho * wo;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)blockDim.x * gridDim.x) {
        const unsigned int ox = i % wo;
        const unsigned int oy = (i / wo) % ho;
        const size_t plane = i / ((size_t)ho * wo);  // image * c + channel
        const unsigned int ch = plane % c;
        const float* src = x + plane * h * w;
        const float* filter = weight + (size_t)ch * k * k;
        const int y0 = (int)(oy * stride) - (int)pad_top;
        const int x0 = (int)(ox * stride) - (int)pad_left;
        float sum = bias[ch];
        for (unsigned int ky = 0; ky < k; ++ky) {
            const int iy = y0 + (int)ky;
            const bool row_inside = iy >= 0 && iy < (int)h;
            for (unsigned int kx = 0; kx < k; ++kx) {
                const int ix = x0 + (int)kx;
                const float v = (row_inside && ix >= 0 && ix < (int)w) ? src[(size_t)iy * w + ix] : 0.0f;
                sum = __fadd_rn(sum, __fmul_rn(filter[ky * k + kx], v));
            }
        }
        if (relu6) {
            sum = fminf(fmaxf(sum, 0.0f), 6.0f);
        }
        y[i] = sum;
    }
}

// In place on a fresh convolution output [n, c, plane]: y += bias (+ residual), then ReLU6
// if asked. residual may be null.
extern "C" __global__ void shoplens_epilogue_f32(
    float* __restrict__ y,
    const float* __restrict__ bias,
    const float* __restrict__ residual,
    unsigned long long total, unsigned int c, unsigned int plane, int relu6)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)blockDim.x * gridDim.x) {
        const float b = bias[(i / plane) % c];
        float v = residual ? __fadd_rn(y[i], __fadd_rn(b, residual[i])) : __fadd_rn(y[i], b);
        if (relu6) {
            v = fminf(fmaxf(v, 0.0f), 6.0f);
        }
        y[i] = v;
    }
}
