// Shared by every rankd kernel: rankd prepends this file to each .cu source
// before handing it to NVRTC (NVRTC sees no include path, and these sources
// include no system headers, so they compile with NVRTC alone).
//
// Item tables live on the device as f32, f16 or bf16; the 16-bit kinds are
// stored as raw `u16` bits and converted here, so no cuda_fp16.h is needed.
// Every conversion rounds to nearest-even, like the `half` crate the host
// uses, so a row written by the scatter kernel equals one uploaded at load.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Row index of an empty top-k slot.
#define RANKD_NONE 0xffffffffu
// Ordered keys of empty slots / "admit everything" and "admit nothing".
#define RANKD_KEY_MIN (-2147483647 - 1)
#define RANKD_KEY_MAX 2147483647

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);  // quiet NaN, as the half crate does
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// One struct per table dtype: the stored type, how many elements one 16-byte
// load holds, and the conversions.
struct DtF32 {
    typedef float T;
    static const int VEC = 4;
    static __device__ __forceinline__ float get(const T* p, size_t i) { return p[i]; }
    static __device__ __forceinline__ T put(float f) { return f; }
    static __device__ __forceinline__ void unpack(uint4 v, float* x) {
        x[0] = __uint_as_float(v.x);
        x[1] = __uint_as_float(v.y);
        x[2] = __uint_as_float(v.z);
        x[3] = __uint_as_float(v.w);
    }
};

struct DtF16 {
    typedef u16 T;
    static const int VEC = 8;
    static __device__ __forceinline__ float get(const T* p, size_t i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ T put(float f) { return f32_to_f16(f); }
    static __device__ __forceinline__ void unpack(uint4 v, float* x) {
        x[0] = f16_to_f32((u16)(v.x & 0xffffu));
        x[1] = f16_to_f32((u16)(v.x >> 16));
        x[2] = f16_to_f32((u16)(v.y & 0xffffu));
        x[3] = f16_to_f32((u16)(v.y >> 16));
        x[4] = f16_to_f32((u16)(v.z & 0xffffu));
        x[5] = f16_to_f32((u16)(v.z >> 16));
        x[6] = f16_to_f32((u16)(v.w & 0xffffu));
        x[7] = f16_to_f32((u16)(v.w >> 16));
    }
};

struct DtBf16 {
    typedef u16 T;
    static const int VEC = 8;
    static __device__ __forceinline__ float get(const T* p, size_t i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ T put(float f) { return f32_to_bf16(f); }
    static __device__ __forceinline__ void unpack(uint4 v, float* x) {
        x[0] = __uint_as_float(v.x << 16);
        x[1] = __uint_as_float(v.x & 0xffff0000u);
        x[2] = __uint_as_float(v.y << 16);
        x[3] = __uint_as_float(v.y & 0xffff0000u);
        x[4] = __uint_as_float(v.z << 16);
        x[5] = __uint_as_float(v.z & 0xffff0000u);
        x[6] = __uint_as_float(v.w << 16);
        x[7] = __uint_as_float(v.w & 0xffff0000u);
    }
};
