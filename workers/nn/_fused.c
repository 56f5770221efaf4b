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

/* -- the training pass: batch norm, relu, the sigmoid loss, moving statistics ------------
 *
 * Loaded by workers/nn/passes.py. Each kernel does, element by element, the float
 * operations of the numpy code in workers/nn/layers.py in the same order, so the two paths
 * give the same numbers (tests/workers/nn/test_passes.py compares them bit for bit).
 * Reductions follow numpy's order: over the rows of a C-contiguous (m, n) array with
 * n >= 2, numpy adds row after row (``add.reduce`` starts from row 0, ``einsum`` from 0);
 * over one contiguous run (n == 1, or a whole array) it uses its pairwise sum, copied
 * here as ``pairwise_*``. The transcendental functions (exp, log1p, tanh) stay numpy's:
 * the caller runs them between ``sigmoid_loss_pre`` and ``sigmoid_loss_post``.
 * Matrices are row-major (m, n); the vectors of a layer are (n,). */

#define DEFINE_PASS_KERNELS(T, SUFFIX, SQRT)                                                \
    /* numpy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src), blocks of 8 \
     * up to 128 values, halves above. */                                                  \
    static T pairwise_##SUFFIX(const T *a, size_t n, size_t s) {                           \
        if (n < 8) {                                                                       \
            T res = 0;                                                                     \
            for (size_t i = 0; i < n; i++) res += a[i * s];                                \
            return res;                                                                    \
        } else if (n <= 128) {                                                             \
            T r[8], res;                                                                   \
            size_t i;                                                                      \
            for (int j = 0; j < 8; j++) r[j] = a[j * s];                                   \
            for (i = 8; i < n - (n % 8); i += 8)                                           \
                for (int j = 0; j < 8; j++) r[j] += a[(i + j) * s];                        \
            res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));       \
            for (; i < n; i++) res += a[i * s];                                            \
            return res;                                                                    \
        } else {                                                                           \
            size_t n2 = n / 2;                                                             \
            n2 -= n2 % 8;                                                                  \
            return pairwise_##SUFFIX(a, n2, s) + pairwise_##SUFFIX(a + n2 * s, n - n2, s); \
        }                                                                                  \
    }                                                                                      \
    /* np.add.reduce(x, axis=0) of a C-contiguous (m, n) array into out (n,). */           \
    static void column_sums_##SUFFIX(size_t m, size_t n, const T *restrict x,              \
                                     T *restrict out) {                                    \
        if (n == 1) {                                                                      \
            out[0] = pairwise_##SUFFIX(x, m, 1);                                           \
            return;                                                                        \
        }                                                                                  \
        for (size_t j = 0; j < n; j++) out[j] = x[j];                                      \
        for (size_t i = 1; i < m; i++) {                                                   \
            const T *row = x + i * n;                                                      \
            for (size_t j = 0; j < n; j++) out[j] += row[j];                               \
        }                                                                                  \
    }                                                                                      \
    /* batchnorm_statistics, batchnorm_forward and (relu != 0) np.maximum(y, 0) into a;   \
     * n >= 2 (einsum's order for one column is not numpy's pairwise sum). */             \
    CLONES void bn_forward_##SUFFIX(size_t m, size_t n, const T *restrict z,               \
                                    const T *restrict gamma, const T *restrict beta,       \
                                    double epsilon, int relu, T *restrict mean,            \
                                    T *restrict var, T *restrict inv_std, T *restrict zn,  \
                                    T *restrict a) {                                       \
        T inv_m = (T)(1.0 / (double)m);                                                    \
        T eps = (T)epsilon;                                                                \
        column_sums_##SUFFIX(m, n, z, mean);                                               \
        for (size_t j = 0; j < n; j++) {                                                   \
            mean[j] = mean[j] * inv_m;                                                     \
            var[j] = 0;                                                                    \
        }                                                                                  \
        for (size_t i = 0; i < m; i++) {                                                   \
            const T *row = z + i * n;                                                      \
            for (size_t j = 0; j < n; j++) {                                               \
                T c = row[j] - mean[j];                                                    \
                var[j] += c * c; /* einsum("ij,ij->j", zc, zc) */                          \
            }                                                                              \
        }                                                                                  \
        for (size_t j = 0; j < n; j++) {                                                   \
            var[j] = var[j] * inv_m;                                                       \
            inv_std[j] = (T)1.0 / SQRT(var[j] + eps);                                      \
        }                                                                                  \
        for (size_t i = 0; i < m; i++) {                                                   \
            const T *row = z + i * n;                                                      \
            T *zr = zn + i * n, *ar = a + i * n;                                           \
            for (size_t j = 0; j < n; j++) {                                               \
                T v = (row[j] - mean[j]) * inv_std[j];                                     \
                zr[j] = v;                                                                 \
                T y = v * gamma[j] + beta[j];                                              \
                ar[j] = (!relu || y >= 0 || y != y) ? y : (T)0; /* NaN propagates */       \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* (a != NULL) dzt = da * (a > 0), then batchnorm_backward; a == NULL: da is dzt.      \
     * scratch holds 3n values; no two buffers overlap. n >= 2 as bn_forward. */           \
    CLONES void bn_backward_##SUFFIX(size_t m, size_t n, const T *restrict da,             \
                                     const T *restrict a, const T *restrict zn,            \
                                     const T *restrict gamma, const T *restrict inv_std,   \
                                     T *restrict dgamma, T *restrict dbeta, T *restrict dz, \
                                     T *restrict scratch) {                                \
        const T *dy = da;                                                                  \
        if (a) {                                                                           \
            for (size_t k = 0; k < m * n; k++) dz[k] = da[k] * (T)(a[k] > 0);              \
            dy = dz;                                                                       \
        }                                                                                  \
        column_sums_##SUFFIX(m, n, dy, dbeta);                                             \
        for (size_t j = 0; j < n; j++) dgamma[j] = 0;                                      \
        for (size_t i = 0; i < m; i++) {                                                   \
            const T *row = dy + i * n, *zr = zn + i * n;                                   \
            for (size_t j = 0; j < n; j++) dgamma[j] += row[j] * zr[j];                    \
        }                                                                                  \
        T *dgm = scratch, *dbm = scratch + n, *gi = scratch + 2 * n;                       \
        for (size_t j = 0; j < n; j++) {                                                   \
            dgm[j] = dgamma[j] / (T)m;                                                     \
            dbm[j] = dbeta[j] / (T)m;                                                      \
            gi[j] = gamma[j] * inv_std[j];                                                 \
        }                                                                                  \
        for (size_t i = 0; i < m; i++) {                                                   \
            const T *row = dy + i * n, *zr = zn + i * n;                                   \
            T *out = dz + i * n;                                                           \
            for (size_t j = 0; j < n; j++)                                                 \
                out[j] = ((row[j] - zr[j] * dgm[j]) - dbm[j]) * gi[j];                     \
        }                                                                                  \
    }                                                                                      \
    /* logits = z + b (in place), h = 0.5 * logits, e = -|logits|: the arguments of       \
     * numpy's tanh, exp then log1p, which the caller runs in place on h and e. */        \
    void sigmoid_loss_pre_##SUFFIX(size_t m, size_t k, T *logits, const T *b, T *h,        \
                                   T *e) {                                                 \
        for (size_t i = 0; i < m; i++)                                                     \
            for (size_t j = 0; j < k; j++) {                                               \
                size_t q = i * k + j;                                                      \
                T l = logits[q] + b[j];                                                    \
                logits[q] = l;                                                             \
                h[q] = (T)0.5 * l;                                                         \
                e[q] = -(l < 0 ? -l : l);                                                  \
            }                                                                              \
    }                                                                                      \
    /* With h = tanh(0.5 * logits) and e = log1p(exp(-|logits|)): the mean binary          \
     * cross-entropy into *loss (np.mean's pairwise sum; e is overwritten by the          \
     * per-example losses), dlogits = (sigmoid(logits) - y) / (m * k), and db, the        \
     * column sums of dlogits. */                                                         \
    void sigmoid_loss_post_##SUFFIX(size_t m, size_t k, const T *logits, const T *y,       \
                                    const T *h, T *e, T *dlogits, T *db, double *loss) {   \
        size_t size = m * k;                                                               \
        for (size_t q = 0; q < size; q++) {                                                \
            T l = logits[q];                                                               \
            T pos = (l >= 0 || l != l) ? l : (T)0;                                         \
            e[q] = (pos - l * y[q]) + e[q];                                                \
            T p = (T)0.5 * ((T)1.0 + h[q]);                                                \
            dlogits[q] = (p - y[q]) / (T)size;                                             \
        }                                                                                  \
        *loss = (double)(T)((double)pairwise_##SUFFIX(e, size, 1) / (double)size);         \
        column_sums_##SUFFIX(m, k, dlogits, db);                                           \
    }                                                                                      \
    /* Keras's moving statistics, moving * momentum + batch * (1 - momentum); out may be   \
     * moving. */                                                                         \
    void moving_update_##SUFFIX(size_t n, const T *moving, const T *batch, double momentum, \
                                T *out) {                                                  \
        T mu = (T)momentum, rest = (T)(1.0 - momentum);                                    \
        for (size_t i = 0; i < n; i++) out[i] = moving[i] * mu + batch[i] * rest;           \
    }

DEFINE_PASS_KERNELS(float, f32, sqrtf)
DEFINE_PASS_KERNELS(double, f64, sqrt)
