/* Fused optimizer kernels: one pass over parameters, gradient and state.
 *
 * Loaded with ctypes by workers/nn/optimizers.py (no Python C-API). Each kernel does,
 * element by element and in the same order, exactly the float operations of the numpy
 * kernel it replaces (built with -ffp-contract=off: no fused multiply-add), so both
 * paths give bit-identical results. Outputs may alias inputs (in-place updates).
 * Every kernel also writes the parameter change into d[i] for the update norm, unless d
 * is NULL (no norm asked for): that store costs a quarter of an Adam update, and the
 * loop-invariant test is hoisted out of the loop (-O3 unswitches it).
 */
#include <math.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* The outputs alias the inputs only element for element (w2 == w), never shifted, so the
 * loops are safe to vectorize; without the promise GCC keeps them scalar. */
#if defined(__GNUC__) && !defined(__clang__)
#define IVDEP _Pragma("GCC ivdep")
#else
#define IVDEP
#endif

#define DEFINE_KERNELS(T, SUFFIX, SQRT)                                                     \
    CLONES void sgd_##SUFFIX(size_t n, const T *w, const T *g, const T *v, T *w2, T *v2,   \
                             T *d, T neg_lr_s, T mu, int nesterov) {                       \
        IVDEP                                                                              \
        for (size_t i = 0; i < n; i++) {                                                   \
            T step = g[i] * neg_lr_s; /* -lr * g */                                        \
            if (mu != (T)0) {                                                              \
                T vi = v[i] * mu + step; /* v = mu * v - lr * g */                          \
                v2[i] = vi;                                                                \
                step = nesterov ? step + vi * mu : vi;                                     \
            } else {                                                                       \
                v2[i] = v[i];                                                              \
            }                                                                              \
            if (d) d[i] = step;                                                            \
            w2[i] = w[i] + step;                                                           \
        }                                                                                  \
    }                                                                                      \
    CLONES void momentum_##SUFFIX(size_t n, const T *w, const T *g, const T *V, T *w2,     \
                                  T *V2, T *d, T c, T b1, T neg_lr) {                      \
        IVDEP                                                                              \
        for (size_t i = 0; i < n; i++) {                                                   \
            T Vi = V[i] * b1 + g[i] * c; /* V = b1 * V + (1 - b1) * g */                    \
            V2[i] = Vi;                                                                    \
            T step = Vi * neg_lr;                                                          \
            if (d) d[i] = step;                                                            \
            w2[i] = w[i] + step;                                                           \
        }                                                                                  \
    }                                                                                      \
    CLONES void rmsprop_##SUFFIX(size_t n, const T *w, const T *g, const T *S, T *w2,      \
                                 T *S2, T *d, T gs, T rho, T eps, T neg_lr_s) {            \
        IVDEP                                                                              \
        for (size_t i = 0; i < n; i++) {                                                   \
            T t = g[i] * gs;                                                               \
            T Si = S[i] * rho + t * t; /* S = rho * S + (1 - rho) * g^2 */                  \
            S2[i] = Si;                                                                    \
            T step = (g[i] / SQRT(Si + eps)) * neg_lr_s;                                   \
            if (d) d[i] = step;                                                            \
            w2[i] = w[i] + step;                                                           \
        }                                                                                  \
    }                                                                                      \
    CLONES void adam_##SUFFIX(size_t n, const T *w, const T *g, const T *m, const T *v,    \
                              T *w2, T *m2, T *v2, T *d, T c1, T b1, T gs, T b2, T eps,    \
                              T neg_lr_t) {                                                \
        IVDEP                                                                              \
        for (size_t i = 0; i < n; i++) {                                                   \
            T mi = m[i] * b1 + g[i] * c1; /* m = b1 * m + (1 - b1) * g */                   \
            T t = g[i] * gs;                                                               \
            T vi = v[i] * b2 + t * t; /* v = b2 * v + (1 - b2) * g^2 */                     \
            m2[i] = mi;                                                                    \
            v2[i] = vi;                                                                    \
            T step = (mi / (SQRT(vi) + eps)) * neg_lr_t;                                   \
            if (d) d[i] = step;                                                            \
            w2[i] = w[i] + step;                                                           \
        }                                                                                  \
    }

DEFINE_KERNELS(float, f32, sqrtf)
DEFINE_KERNELS(double, f64, sqrt)
