// Epilogue of every tower layer: cuBLAS computes y = x·Wᵀ, this adds the bias
// and applies the layer's activation in place. Modes: 0 none (the two-tower
// output), 1 ReLU (every hidden layer), 2 sigmoid (the ranker's output, so
// the scores leave the device as probabilities, as the CPU backend returns).

extern "C" __global__ void bias_act(float* __restrict__ y, u32 rows, u32 cols,
                                    const float* __restrict__ bias, u32 mode) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = y[i] + bias[i % cols];
        if (mode == 1) {
            v = fmaxf(v, 0.0f);
        } else if (mode == 2) {
            v = 1.0f / (1.0f + expf(-v));
        }
        y[i] = v;
    }
}
