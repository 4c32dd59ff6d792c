/* libcublas.so.12 for faiss-gpu 1.15.1 on a machine that has only CUDA 13's cuBLAS.
 *
 * faiss-gpu 1.15.1 is built for CUDA 12 and calls eight cuBLAS functions, versioned
 * "libcublas.so.12". The lent H200 has cuBLAS 13 (with torch 2.11+cu130), whose functions of these
 * names take the same arguments. This library exports the eight names under the version
 * faiss asks for (cublas12_shim.map) and forwards each call to the function of that name in
 * cuBLAS 13, opened on first use from CUBLAS13 (a path given when compiling). Where cuBLAS 13
 * or a function is missing it says so on stderr and returns CUBLAS_STATUS_NOT_INITIALIZED, which
 * faiss reports as an error instead of crashing.
 *
 * Arguments are passed through with the types of the x86-64 calling convention: handles, streams
 * and buffers as pointers, enums and sizes as int, strides as long long.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#ifndef CUBLAS13
#define CUBLAS13 "libcublas.so.13"
#endif

#define NOT_INITIALIZED 1

typedef void *ptr;

static void *forward(const char *name) {
    static void *library;
    if (!library) {
        library = dlopen(CUBLAS13, RTLD_NOW | RTLD_LOCAL);
        if (!library) {
            fprintf(stderr, "cublas12 shim: cannot open %s: %s\n", CUBLAS13, dlerror());
            return NULL;
        }
    }
    void *function = dlsym(library, name);
    if (!function) {
        char plain[64];
        size_t n = strlen(name);
        if (n > 3 && n < sizeof plain && strcmp(name + n - 3, "_v2") == 0) {  /* cuBLAS 13 may drop the suffix */
            memcpy(plain, name, n - 3);
            plain[n - 3] = '\0';
            function = dlsym(library, plain);
        }
    }
    if (!function) fprintf(stderr, "cublas12 shim: %s has no %s\n", CUBLAS13, name);
    return function;
}

#define FORWARD(name, params, args)                                   \
    int name params {                                                 \
        static int (*f) params;                                       \
        if (!f) f = (int (*) params) forward(#name);                  \
        return f ? f args : NOT_INITIALIZED;                          \
    }

FORWARD(cublasCreate_v2, (ptr handle), (handle))
FORWARD(cublasDestroy_v2, (ptr handle), (handle))
FORWARD(cublasSetStream_v2, (ptr handle, ptr stream), (handle, stream))
FORWARD(cublasGetMathMode, (ptr handle, ptr mode), (handle, mode))
FORWARD(cublasSetMathMode, (ptr handle, int mode), (handle, mode))
FORWARD(cublasSgemmEx,
        (ptr h, int ta, int tb, int m, int n, int k, ptr alpha, ptr a, int at, int lda, ptr b, int bt, int ldb,
         ptr beta, ptr c, int ct, int ldc),
        (h, ta, tb, m, n, k, alpha, a, at, lda, b, bt, ldb, beta, c, ct, ldc))
FORWARD(cublasGemmEx,
        (ptr h, int ta, int tb, int m, int n, int k, ptr alpha, ptr a, int at, int lda, ptr b, int bt, int ldb,
         ptr beta, ptr c, int ct, int ldc, int compute, int algo),
        (h, ta, tb, m, n, k, alpha, a, at, lda, b, bt, ldb, beta, c, ct, ldc, compute, algo))
FORWARD(cublasGemmStridedBatchedEx,
        (ptr h, int ta, int tb, int m, int n, int k, ptr alpha, ptr a, int at, int lda, long long sa, ptr b, int bt,
         int ldb, long long sb, ptr beta, ptr c, int ct, int ldc, long long sc, int batches, int compute, int algo),
        (h, ta, tb, m, n, k, alpha, a, at, lda, sa, b, bt, ldb, sb, beta, c, ct, ldc, sc, batches, compute, algo))
