/*
 * Whole phases of the P-MLP dynamics in one call (eqprop.cpu_kernels).
 *
 * One synchronous step of PMLP.step, for every layer n of the state:
 *
 *     u_n = offset_n + scale * (W_n s_{n-1} + s_{n+1} @ top_down_n)
 *     s_n = core(u_n)
 *
 * with the first layer's offset per sample (its drive, W_1 x + b_1, folded with
 * the activation's scale and shift) and the others' per unit, and on the last
 * layer the squared-error nudge beta_b (target - s_last) added inside core
 * (times scale) or after it. Built once with REAL = float, once with
 * REAL = double (-DEQPROP_DOUBLE).
 *
 * With `alternating`, a step is a sweep of PMLP.half_step: the even layers
 * (0, 2, ...) from the current state, then the odd layers from the even ones
 * just computed. Each layer reads only its neighbours (and the last layer its
 * own state for the nudge), so a sweep costs what a synchronous step costs.
 *
 * With a tolerance, every `check_every` steps each sample's residual (the
 * largest change of any of its units in that step) is measured, and a sample
 * whose residual is at most the tolerance stops there: its state is final and
 * it costs nothing more. The phase ends when every sample has stopped, or at
 * the cap. A sample's result depends on nothing but its own rows: not on the
 * other samples, nor on the thread count (eqprop.solvers.tolerance).
 *
 * Why: a PyTorch step of a 784-512-10 network is four small kernels, each far
 * from the hardware's speed at these shapes, plus the interpreter between
 * them. Here a phase of T steps is one call that keeps the batch's state in
 * cache, with the batch's rows split across threads (samples are independent,
 * so the threads never wait for each other).
 *
 * Two dense products around the phases share the same threads (eqprop_linear: the
 * first layer's drive x W^T + b, computed once per batch; eqprop_outer: a weight
 * gradient alpha left^T right): on one PyTorch thread beside the kernel, these two
 * 50x784x512 products took about 1.2 ms of a 5.5-6 ms training step of the
 * Laborieux MNIST preset on the development machine, with the other core idle.
 *
 * NaN and inf propagate as in PyTorch: no fast-math, and every clamp is a
 * comparison that a NaN fails.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* VECTOR_BYTES: the SIMD register width the build targets (64 with AVX-512, else 32). */
#ifdef __AVX512F__
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif
#ifdef EQPROP_DOUBLE
typedef double REAL;
#else
typedef float REAL;
#endif
#define LANES (VECTOR_BYTES / (int)sizeof(REAL))

#define CORE_SIGMOID 0
#define CORE_CLAMP01 1

#ifndef EQPROP_DOUBLE
/* exp(x) for float: Cody-Waite reduction to |f| <= ln2/2 and Cephes' degree-7 polynomial
 * (about 1 ulp), written without branches or library calls so that the compiler vectorizes the
 * loop that calls it. x is clamped to [-87, 87]: 2^n stays a normal float, and so does the
 * sigmoid 1/(1 + exp(87)) = 1.6e-38 of a unit far below threshold. PyTorch's sigmoid returns a
 * subnormal number there (or 0), which is no closer to anything that matters and makes every
 * later product with it many times slower on x86 processors. */
static inline float exp_real(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 87.0f ? 87.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float r = x * 1.44269504088896341f + magic;
    uint32_t bits;
    memcpy(&bits, &r, sizeof bits);
    float n = r - magic;
    float f = x - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    float y = p * (f * f) + f + 1.0f;
    uint32_t scale_bits = (bits - 0x4B400000u + 127u) << 23; /* 2^n, n = bits - bits(magic) */
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return y * scale;
}
#else
static inline double exp_real(double x) { return exp(x); }
#endif

static void activate(REAL *restrict u, int64_t count, int64_t core) {
    if (core == CORE_SIGMOID) {
        for (int64_t i = 0; i < count; i++)
            u[i] = (REAL)1 / ((REAL)1 + exp_real(-u[i]));
    } else {
        for (int64_t i = 0; i < count; i++) {
            REAL v = u[i];
            v = v < (REAL)0 ? (REAL)0 : v;
            u[i] = v > (REAL)1 ? (REAL)1 : v;
        }
    }
}

/* LANES values of REAL in one SIMD register (GCC/Clang vector extension: AVX-512 or AVX2 where
 * the processor has them; the compiler splits the vector into narrower registers otherwise). */
typedef REAL vec __attribute__((vector_size(VECTOR_BYTES)));

static inline vec load(const REAL *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline REAL lane_sum(vec v) {
    REAL s = 0;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

static inline void store(REAL *p, vec v) { memcpy(p, &v, sizeof v); }

/* Keep v in a register: stops the compiler from folding a load of v into each of its uses
 * (x86 with AVX, where a vec is one register); elsewhere nothing. */
#if defined(__AVX512F__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__AVX__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* a in every lane (a scalar operand of a vector operation is broadcast: one vbroadcast) */
static inline vec splat(REAL a) { return a - (vec){0}; }

/* out[b, o] += scale * W[o, :] . below[b, :] -- W is [width, in]. The rows of W are taken in
 * blocks that stay in the L1 cache while every sample visits them; inside a block, two rows
 * and four samples make eight independent accumulators that share each load. Every (sample,
 * row) pair goes through this same code (a short group repeats its first sample or row and
 * drops the copy), so a sample's result never depends on which samples share its slice. */
static void add_forward(REAL *restrict out, const REAL *restrict w_all, const REAL *restrict below,
                        int64_t batch, int64_t width, int64_t in, REAL scale) {
    int64_t block = (int64_t)(16384 / sizeof(REAL)) / (in > 0 ? in : 1);
    block = block < 2 ? 2 : block - block % 2;
    for (int64_t o0 = 0; o0 < width; o0 += block) {
        const int64_t o1 = o0 + block < width ? o0 + block : width;
        for (int64_t b = 0; b < batch; b += 4) {
            const int64_t samples = batch - b < 4 ? batch - b : 4;
            const REAL *p[4];
            for (int k = 0; k < 4; k++) p[k] = below + (b + (k < samples ? k : 0)) * in;
            for (int64_t o = o0; o < o1; o += 2) {
                const int pair = o + 1 < o1;
                const REAL *wa = w_all + o * in, *wb = pair ? wa + in : wa;
                vec a[4] = {{0}}, c[4] = {{0}};
                int64_t i = 0;
                for (; i + LANES <= in; i += LANES) {
                    /* each vector loaded once into a register (the asm statements keep the compiler
                     * from reloading it for every product, which made this loop load-bound) */
                    vec va = load(wa + i), vb = load(wb + i);
                    IN_REGISTER(va);
                    IN_REGISTER(vb);
                    for (int k = 0; k < 4; k++) {
                        vec x = load(p[k] + i);
                        IN_REGISTER(x);
                        a[k] += va * x;
                        c[k] += vb * x;
                    }
                }
                REAL sa[4] = {lane_sum(a[0]), lane_sum(a[1]), lane_sum(a[2]), lane_sum(a[3])};
                REAL sb[4] = {lane_sum(c[0]), lane_sum(c[1]), lane_sum(c[2]), lane_sum(c[3])};
                for (int k = 0; k < samples; k++) {
                    for (int64_t j = i; j < in; j++) {
                        sa[k] += wa[j] * p[k][j];
                        sb[k] += wb[j] * p[k][j];
                    }
                    out[(b + k) * width + o] += scale * sa[k];
                    if (pair) out[(b + k) * width + o + 1] += scale * sb[k];
                }
            }
        }
    }
}

/* out[b, :] += scale * above[b, :] @ td -- td is [above_width, width]. The rows of td are taken
 * in groups that fit in the L1 cache (all of them for a narrow layer above, such as 10 output
 * units); for each sample, eight vectors of out at a time take the products of every row of
 * the group in turn: eight independent sums in registers, and one pass over the sample's units
 * per group (a pass per row had made each pass wait on the stores of the last). */
#define TOP_DOWN_VECTORS 8
#define TOP_DOWN_BYTES 24576
static void add_top_down(REAL *restrict out, const REAL *restrict td, const REAL *restrict above,
                         int64_t batch, int64_t width, int64_t above_width, REAL scale) {
    const int64_t block = TOP_DOWN_VECTORS * LANES;
    int64_t group = (int64_t)(TOP_DOWN_BYTES / sizeof(REAL)) / (width > 0 ? width : 1);
    group = group < 1 ? 1 : group;
    for (int64_t j0 = 0; j0 < above_width; j0 += group) {
        const int64_t j1 = j0 + group < above_width ? j0 + group : above_width;
        for (int64_t b = 0; b < batch; b++) {
            REAL *restrict o = out + b * width;
            const REAL *a = above + b * above_width;
            int64_t i = 0;
            for (; i + block <= width; i += block) {
                vec acc[TOP_DOWN_VECTORS];
                for (int v = 0; v < TOP_DOWN_VECTORS; v++) acc[v] = load(o + i + v * LANES);
                for (int64_t j = j0; j < j1; j++) {
                    const vec aj = splat(scale * a[j]);
                    const REAL *r = td + j * width + i;
                    for (int v = 0; v < TOP_DOWN_VECTORS; v++) acc[v] += aj * load(r + v * LANES);
                }
                for (int v = 0; v < TOP_DOWN_VECTORS; v++) store(o + i + v * LANES, acc[v]);
            }
            for (; i + LANES <= width; i += LANES) {
                vec acc = load(o + i);
                for (int64_t j = j0; j < j1; j++) acc += splat(scale * a[j]) * load(td + j * width + i);
                store(o + i, acc);
            }
            for (; i < width; i++) {
                REAL sum = o[i];
                for (int64_t j = j0; j < j1; j++) sum += scale * a[j] * td[j * width + i];
                o[i] = sum;
            }
        }
    }
}

/* The nudge beta_b (target - s_last) of the squared-error loss, times `factor`, added to out. */
static void add_nudge(REAL *restrict out, const REAL *restrict last, const REAL *restrict target,
                      const REAL *restrict beta, int64_t batch, int64_t width, REAL factor) {
    for (int64_t b = 0; b < batch; b++) {
        REAL g = factor * beta[b];
        for (int64_t i = 0; i < width; i++)
            out[b * width + i] += g * (target[b * width + i] - last[b * width + i]);
    }
}

/* The softmax readout's nudge (Laborieux 2021 eq. 19), times `factor`, added to out:
 * beta_b (target - softmax(W_out s_last + b_out)) @ W_out, W_out being [classes, width]. */
static void add_softmax_nudge(REAL *restrict out, const REAL *restrict last, const REAL *restrict target,
                              const REAL *restrict beta, int64_t batch, int64_t width, int64_t classes,
                              const REAL *restrict w_out, const REAL *restrict b_out, REAL factor,
                              REAL *restrict scratch) {
    for (int64_t b = 0; b < batch; b++) {
        const REAL *s = last + b * width;
        REAL top = -INFINITY, total = 0;
        for (int64_t c = 0; c < classes; c++) {
            const REAL *w = w_out + c * width;
            REAL z = b_out[c];
            for (int64_t i = 0; i < width; i++) z += w[i] * s[i];
            scratch[c] = z;
            top = z > top ? z : top;
        }
        for (int64_t c = 0; c < classes; c++) {
            scratch[c] = exp_real(scratch[c] - top);
            total += scratch[c];
        }
        REAL *o = out + b * width;
        for (int64_t c = 0; c < classes; c++) {
            const REAL g = factor * beta[b] * (target[b * classes + c] - scratch[c] / total);
            const REAL *w = w_out + c * width;
            for (int64_t i = 0; i < width; i++) o[i] += g * w[i];
        }
    }
}

/* One call's arguments; each thread runs the same phase on its own rows [start, stop). */
typedef struct {
    int64_t layers;
    const int64_t *sizes;
    const REAL *const *weights, *const *top_down, *const *offsets;
    REAL scale;
    int64_t core;
    const REAL *beta, *target;
    int64_t nudge_inside;
    int64_t classes;                      /* > 0: softmax readout W_out, b_out; 0: squared error */
    const REAL *w_out, *b_out;
    const REAL *const *initial;
    REAL *const *final;
    int64_t steps, alternating;
    double tol;                           /* > 0: samples stop at this residual, checked every check_every */
    int64_t check_every;
    REAL *residual;                       /* [batch]: each sample's residual at its last step, or NULL */
    int64_t *taken;                       /* [batch]: each sample's steps, or NULL */
    int64_t start, stop;
    int status;
} Phase;

/* Largest |a - b| over `width` values. */
static REAL max_change(const REAL *restrict a, const REAL *restrict b, int64_t width) {
    REAL top = 0;
    for (int64_t i = 0; i < width; i++) {
        const REAL d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        top = d > top ? d : top;
    }
    return top;
}

/* Exchange rows i and j (of `width` values each) of a row-major block. */
static void swap_rows(REAL *rows, int64_t i, int64_t j, int64_t width) {
    for (int64_t k = 0; k < width; k++) {
        const REAL t = rows[i * width + k];
        rows[i * width + k] = rows[j * width + k];
        rows[j * width + k] = t;
    }
}

/* The phase on rows [start, stop) of the batch; sets status 1 if scratch memory ran out.
 *
 * The rows still running are kept first, rows [0, active): a sample that stops is copied out to
 * its own final rows, then exchanged with the last running row (in the state and in its own
 * drive, target and beta), so every product runs over one contiguous block that shrinks as
 * samples settle. row[b] is the batch row of local row b. */
static void run_rows(void *job) {
    Phase *p = job;
    const int64_t layers = p->layers, last = layers - 1, rows = p->stop - p->start, first = p->start;
    const int64_t *sizes = p->sizes;
    const int64_t target_width = p->classes ? p->classes : sizes[last];
    const int nudged_phase = p->beta != NULL;
    int64_t total = 0;
    for (int64_t n = 0; n < layers; n++) total += rows * sizes[n];
    const int64_t locals = rows * sizes[0] + (nudged_phase ? rows * (target_width + 1) : 0);
    REAL **buffers = malloc(2 * (size_t)layers * sizeof(REAL *));
    int64_t *row = malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int64_t));
    REAL *change = malloc((size_t)(rows > 0 ? rows : 1) * sizeof(REAL));
    REAL *pool = malloc((size_t)(2 * total + locals + p->classes + 1) * sizeof(REAL));  /* + readout scores */
    if (buffers == NULL || row == NULL || change == NULL || pool == NULL) {
        free(buffers);
        free(row);
        free(change);
        free(pool);
        p->status = 1;
        return;
    }
    /* current[n] holds the state, next[n] receives a layer's update; the two swap per layer */
    REAL **current = buffers, **next = buffers + layers;
    REAL *free_pool = pool;
    for (int64_t n = 0; n < layers; n++) {
        current[n] = free_pool;
        next[n] = free_pool + rows * sizes[n];
        free_pool += 2 * rows * sizes[n];
        memcpy(current[n], p->initial[n] + first * sizes[n], (size_t)(rows * sizes[n]) * sizeof(REAL));
    }
    REAL *drive = free_pool, *target = NULL, *beta = NULL, *scores = free_pool + locals;
    memcpy(drive, p->offsets[0] + first * sizes[0], (size_t)(rows * sizes[0]) * sizeof(REAL));
    if (nudged_phase) {
        target = drive + rows * sizes[0];
        beta = target + rows * target_width;
        memcpy(target, p->target + first * target_width, (size_t)(rows * target_width) * sizeof(REAL));
        memcpy(beta, p->beta + first, (size_t)rows * sizeof(REAL));
    }
    for (int64_t b = 0; b < rows; b++) {
        row[b] = first + b;
        change[b] = 0;
    }
    const int64_t halves = p->alternating ? 2 : 1, stride = p->alternating ? 2 : 1;
    int64_t active = rows;
    for (int64_t t = 0; t < p->steps && active > 0; t++) {
        const int check = t + 1 == p->steps || (p->tol > 0 && (t + 1) % p->check_every == 0);
        if (check)
            for (int64_t b = 0; b < active; b++) change[b] = 0;
        for (int64_t half = 0; half < halves; half++) {
            for (int64_t n = half; n < layers; n += stride) {
                const int64_t width = sizes[n];
                REAL *u = next[n];
                if (n == 0) {
                    memcpy(u, drive, (size_t)(active * width) * sizeof(REAL));
                } else {
                    for (int64_t b = 0; b < active; b++)
                        memcpy(u + b * width, p->offsets[n], (size_t)width * sizeof(REAL));
                    add_forward(u, p->weights[n], current[n - 1], active, width, sizes[n - 1], p->scale);
                }
                if (n < last)
                    add_top_down(u, p->top_down[n], current[n + 1], active, width, sizes[n + 1], p->scale);
                const int nudged = n == last && nudged_phase;
                if (nudged && p->classes)
                    add_softmax_nudge(u, current[n], target, beta, active, width, p->classes, p->w_out, p->b_out,
                                      p->scale, scores);
                else if (nudged && p->nudge_inside)
                    add_nudge(u, current[n], target, beta, active, width, p->scale);
                /* row by row: a sample's result must not depend on which rows share its slice */
                for (int64_t b = 0; b < active; b++) activate(u + b * width, width, p->core);
                if (nudged && !p->classes && !p->nudge_inside)
                    add_nudge(u, current[n], target, beta, active, width, (REAL)1);
            }
            for (int64_t n = half; n < layers; n += stride) {
                if (check)
                    for (int64_t b = 0; b < active; b++) {
                        const REAL c = max_change(next[n] + b * sizes[n], current[n] + b * sizes[n], sizes[n]);
                        change[b] = c > change[b] ? c : change[b];
                    }
                REAL *swap = current[n];
                current[n] = next[n];
                next[n] = swap;
            }
        }
        if (!check)
            continue;
        for (int64_t b = 0; b < active;) {
            if (t + 1 < p->steps && !(change[b] <= p->tol)) {
                b++;
                continue;
            }
            /* this sample stops here: out to its final rows, then the last running row takes its place */
            for (int64_t n = 0; n < layers; n++)
                memcpy(p->final[n] + row[b] * sizes[n], current[n] + b * sizes[n], (size_t)sizes[n] * sizeof(REAL));
            if (p->residual) p->residual[row[b]] = change[b];
            if (p->taken) p->taken[row[b]] = t + 1;
            const int64_t end = --active;
            if (b == end)
                continue;
            for (int64_t n = 0; n < layers; n++) swap_rows(current[n], b, end, sizes[n]);
            swap_rows(drive, b, end, sizes[0]);
            if (nudged_phase) {
                swap_rows(target, b, end, target_width);
                swap_rows(beta, b, end, 1);
            }
            const int64_t r = row[b];
            row[b] = row[end];
            row[end] = r;
            const REAL c = change[b];
            change[b] = change[end];
            change[end] = c;
        }
    }
    if (p->steps == 0)   /* no step: the initial state is final */
        for (int64_t b = 0; b < rows; b++) {
            for (int64_t n = 0; n < layers; n++)
                memcpy(p->final[n] + row[b] * sizes[n], current[n] + b * sizes[n], (size_t)sizes[n] * sizeof(REAL));
            if (p->residual) p->residual[row[b]] = 0;
            if (p->taken) p->taken[row[b]] = 0;
        }
    free(pool);
    free(change);
    free(row);
    free(buffers);
    p->status = 0;
}

/* ---- dense products ---------------------------------------------------------------------- */

/* Rows [start, stop) of eqprop_linear's product: each thread computes whole output rows, so every
 * output element goes through the same operations in the same order whatever the thread count. */
typedef struct {
    const REAL *a, *b, *bias;   /* operands (see eqprop_linear) */
    REAL *out;
    int64_t batch, width, in, pad;
    const int64_t *columns;     /* the inputs not zero in every sample, `kept` of them */
    int64_t kept;
    int64_t start, stop;
    int status;
} Product;

/* `count` REALs on a 64-byte boundary (whole vectors load without splitting cache lines); never
 * NULL for a count of 0, so that NULL always means the memory ran out. */
static REAL *aligned_reals(int64_t count) {
    const size_t bytes = ((size_t)count * sizeof(REAL) + 63) / 64 * 64;
    return aligned_alloc(64, bytes > 0 ? bytes : 64);
}

#define PANEL 128      /* inputs per pass of eqprop_linear: a panel of x^T stays in the L1 cache */
#define CHUNK_VECTORS 4

/* acc[r][0 : NV*LANES] += sum over i < k of w[r][columns[i]] xt[i][0 : NV*LANES] for three
 * weight rows r (xt rows `stride` apart): the twelve accumulators of up to four vectors of
 * samples stay in registers, and each vector of xt is loaded once for the three rows. Rows past
 * the slice's end are passed as copies of its last row (the same operations as any row; their
 * results are dropped). */
#define LINEAR_KERNEL(NV)                                                                          \
    static void linear_##NV(REAL *restrict const acc[3], const REAL *restrict const w[3],            \
                            const int64_t *restrict columns, const REAL *restrict xt, int64_t k,     \
                            int64_t stride) {                                                        \
        vec a[NV], b[NV], c[NV];                                                                     \
        for (int v = 0; v < NV; v++) {                                                               \
            a[v] = load(acc[0] + v * LANES);                                                         \
            b[v] = load(acc[1] + v * LANES);                                                         \
            c[v] = load(acc[2] + v * LANES);                                                         \
        }                                                                                            \
        for (int64_t i = 0; i < k; i++) {                                                            \
            const int64_t column = columns[i];                                                       \
            const vec s0 = splat(w[0][column]), s1 = splat(w[1][column]), s2 = splat(w[2][column]);  \
            for (int v = 0; v < NV; v++) {                                                           \
                vec xv = load(xt + i * stride + v * LANES);                                          \
                IN_REGISTER(xv); /* one load for the three rows (not one per FMA) */                 \
                a[v] += s0 * xv;                                                                     \
                b[v] += s1 * xv;                                                                     \
                c[v] += s2 * xv;                                                                     \
            }                                                                                        \
        }                                                                                            \
        for (int v = 0; v < NV; v++) {                                                               \
            store(acc[0] + v * LANES, a[v]);                                                         \
            store(acc[1] + v * LANES, b[v]);                                                         \
            store(acc[2] + v * LANES, c[v]);                                                         \
        }                                                                                            \
    }
LINEAR_KERNEL(1) LINEAR_KERNEL(2) LINEAR_KERNEL(3) LINEAR_KERNEL(4)
typedef void (*LinearKernel)(REAL *restrict const[3], const REAL *restrict const[3], const int64_t *restrict,
                             const REAL *restrict, int64_t, int64_t);
static const LinearKernel linear_kernels[CHUNK_VECTORS + 1] = {NULL, linear_1, linear_2, linear_3, linear_4};

/* out[b, o] = bias[o] + W[o, :] . x[b, :] for the rows o of this slice; a = the kept columns of
 * x, transposed and padded to `pad` samples ([kept, pad]), b = W ([width, in]). The samples are
 * taken in chunks of at most CHUNK_VECTORS vectors, the inputs in panels of PANEL, the rows
 * three at a time. */
static void run_linear(void *job) {
    Product *p = job;
    const int64_t rows = p->stop - p->start, pad = p->pad, vectors = pad / LANES;
    const int64_t chunks = (vectors + CHUNK_VECTORS - 1) / CHUNK_VECTORS;
    REAL *acc = aligned_reals((rows + 2) * pad);  /* + the rows that copies of the last one write */
    if (acc == NULL) {
        p->status = 1;
        return;
    }
    memset(acc, 0, (size_t)((rows + 2) * pad) * sizeof(REAL));
    for (int64_t i0 = 0; i0 < p->kept; i0 += PANEL) {
        const int64_t k = p->kept - i0 < PANEL ? p->kept - i0 : PANEL;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t first = vectors * c / chunks, count = vectors * (c + 1) / chunks - first;
            for (int64_t r = 0; r < rows; r += 3) {
                REAL *sums[3];
                const REAL *weights[3];
                for (int j = 0; j < 3; j++) {
                    sums[j] = acc + (r + j) * pad + first * LANES;  /* past the slice: scratch rows */
                    weights[j] = p->b + (p->start + (r + j < rows ? r + j : rows - 1)) * p->in;
                }
                linear_kernels[count](sums, weights, p->columns + i0, p->a + i0 * pad + first * LANES, k, pad);
            }
        }
    }
    for (int64_t s = 0; s < p->batch; s++)
        for (int64_t r = 0; r < rows; r++)
            p->out[s * p->width + p->start + r] = p->bias[p->start + r] + acc[r * pad + s];
    free(acc);
    p->status = 0;
}

/* A rank update g = alpha a b, a = lt ([rows, samples], already transposed), b = [samples, cols]
 * with its rows `stride` apart, for the rows [start, stop) of g. With `overwrite`, out = g
 * (eqprop_outer); else out += g * to_total and, where param is not NULL, param += g * to_param
 * (eqprop_continual_phase: an update is made where its product is summed, g is never stored). */
typedef struct {
    const REAL *lt, *b;
    REAL *out, *param;
    int64_t samples, rows, cols, stride;
    REAL alpha, to_total, to_param;
    int overwrite;
    int64_t start, stop;
    int status;
} Outer;

static inline void outer_store(const Outer *p, int64_t o, int64_t i, vec sum) {
    const vec g = splat(p->alpha) * sum;
    REAL *t = p->out + o * p->cols + i;
    if (p->overwrite) {
        store(t, g);
        return;
    }
    store(t, load(t) + g * splat(p->to_total));
    if (p->param != NULL) {
        REAL *w = p->param + o * p->cols + i;
        store(w, load(w) + g * splat(p->to_param));
    }
}

/* g[o, i : i + VECTORS*LANES] for rows o0 and o1 (a lone row is passed as o1 = o0: it goes
 * through the same operations as any other, its copy dropped) */
#define OUTER_KERNEL(VECTORS)                                                                     \
    static void outer_##VECTORS(const Outer *p, int64_t o0, int64_t o1, int64_t i) {              \
        const REAL *d0 = p->lt + o0 * p->samples, *d1 = p->lt + o1 * p->samples;                  \
        vec a[VECTORS] = {0}, c[VECTORS] = {0};                                                   \
        for (int64_t s = 0; s < p->samples; s++) {                                                \
            const vec s0 = splat(d0[s]), s1 = splat(d1[s]);                                       \
            const REAL *x = p->b + s * p->stride + i;                                             \
            for (int v = 0; v < VECTORS; v++) {                                                   \
                vec xv = load(x + v * LANES);                                                     \
                IN_REGISTER(xv); /* one load for both rows (not one per FMA) */                   \
                a[v] += s0 * xv;                                                                  \
                c[v] += s1 * xv;                                                                  \
            }                                                                                     \
        }                                                                                         \
        for (int v = 0; v < VECTORS; v++) {                                                       \
            outer_store(p, o0, i + v * LANES, a[v]);                                              \
            if (o1 != o0) outer_store(p, o1, i + v * LANES, c[v]);                                \
        }                                                                                         \
    }
#define OUTER_VECTORS 6  /* the vectors of outer_6 */
OUTER_KERNEL(6) OUTER_KERNEL(1)

/* Two rows and OUTER_VECTORS vectors of columns at a time (twelve accumulators); the columns
 * are the outer loop, so that the slice of b they read stays in the L1 cache while every row
 * pair passes over it. */
static void run_outer(void *job) {
    Outer *p = job;
    const int64_t cols = p->cols;
    int64_t i = 0;
    for (; i + OUTER_VECTORS * LANES <= cols; i += OUTER_VECTORS * LANES)
        for (int64_t o = p->start; o < p->stop; o += 2) outer_6(p, o, o + 1 < p->stop ? o + 1 : o, i);
    for (; i + LANES <= cols; i += LANES)
        for (int64_t o = p->start; o < p->stop; o += 2) outer_1(p, o, o + 1 < p->stop ? o + 1 : o, i);
    for (; i < cols; i++)
        for (int64_t o = p->start; o < p->stop; o++) {
            REAL sum = 0;
            for (int64_t s = 0; s < p->samples; s++) sum += p->lt[o * p->samples + s] * p->b[s * p->stride + i];
            const REAL g = p->alpha * sum;
            REAL *t = p->out + o * cols + i;
            *t = p->overwrite ? g : *t + g * p->to_total;
            if (p->param != NULL) p->param[o * cols + i] += g * p->to_param;
        }
    p->status = 0;
}

/*
 * Worker threads, started on first use and kept: starting a thread for every phase costs about
 * as much as a small phase. Between phases a worker spins (yielding the processor to anything
 * else runnable) for up to SPIN_SECONDS, so the next phase of the same batch finds it awake, then
 * sleeps on a condition variable. One call at a time uses the workers (call_lock).
 */
#define MAX_THREADS 64
#define SPIN_SECONDS 0.005
enum { IDLE, POSTED, DONE };

typedef struct {
    pthread_t handle;
    void (*run)(void *job);
    void *job;
    atomic_int status;
} Worker;

static Worker workers[MAX_THREADS];
static int started_workers = 0;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_up = PTHREAD_COND_INITIALIZER;

static double seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

static void *worker_main(void *self) {
    Worker *w = self;
    for (;;) {
        const double since = seconds();
        while (atomic_load_explicit(&w->status, memory_order_acquire) != POSTED) {
            if (seconds() - since < SPIN_SECONDS) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&sleep_lock);
            while (atomic_load_explicit(&w->status, memory_order_acquire) != POSTED)
                pthread_cond_wait(&wake_up, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
        }
        w->run(w->job);
        atomic_store_explicit(&w->status, DONE, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of its parent's threads: it starts its own when it needs them. */
static void forget_workers(void) {
    started_workers = 0;
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake_up, NULL);
}

/* Start workers up to `wanted` (index 1 on; the caller is thread 0); returns how many threads,
 * the caller included, are available. Workers block every signal, so that a signal such as
 * Ctrl-C always reaches the calling (Python) thread, never a worker. */
static int64_t start_workers(int64_t wanted) {
    static int registered = 0;
    if (started_workers + 1 >= wanted) return wanted;  /* the common case: no signal mask calls */
    if (!registered) registered = pthread_atfork(NULL, NULL, forget_workers) == 0;
    sigset_t all, caller;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &caller);  /* inherited by the threads created here */
    while (started_workers + 1 < wanted) {
        Worker *w = &workers[started_workers + 1];
        atomic_store(&w->status, IDLE);
        if (pthread_create(&w->handle, NULL, worker_main, w) != 0) break;
        pthread_detach(w->handle);
        started_workers++;
    }
    pthread_sigmask(SIG_SETMASK, &caller, NULL);
    return started_workers + 1 < wanted ? started_workers + 1 : wanted;
}

/* Run run(jobs[i]) for i < count, jobs being `size` bytes apart: the calling thread takes
 * jobs[0], a worker each of the others (and the caller those no worker could be started for). */
static void run_parallel(void (*run)(void *), void *jobs, size_t size, int64_t count) {
    char *job = jobs;
    pthread_mutex_lock(&call_lock);
    const int64_t started = start_workers(count);
    pthread_mutex_lock(&sleep_lock);
    for (int64_t i = 1; i < started; i++) {
        workers[i].run = run;
        workers[i].job = job + i * size;
        atomic_store_explicit(&workers[i].status, POSTED, memory_order_release);
    }
    pthread_cond_broadcast(&wake_up);
    pthread_mutex_unlock(&sleep_lock);
    run(job);
    for (int64_t i = started; i < count; i++) run(job + i * size);
    for (int64_t i = 1; i < started; i++) {
        while (atomic_load_explicit(&workers[i].status, memory_order_acquire) != DONE) sched_yield();
        atomic_store_explicit(&workers[i].status, IDLE, memory_order_relaxed);
    }
    pthread_mutex_unlock(&call_lock);
}

/* How many slices of at least `least` rows (at most `threads`, MAX_THREADS) a range of `rows` takes. */
static int64_t slices(int64_t rows, int64_t least, int64_t threads) {
    int64_t count = rows / least < threads ? rows / least : threads;
    return count < 1 ? 1 : (count > MAX_THREADS ? MAX_THREADS : count);
}

/*
 * Run `steps` steps on a batch of `batch` samples; every array is row-major and contiguous.
 *
 *   sizes[n]       width of state layer n (n = 0 .. layers-1)
 *   weights[n]     W_n, [sizes[n], sizes[n-1]], for n >= 1 (weights[0] unused)
 *   top_down[n]    [sizes[n+1], sizes[n]] (W_{n+1}, or a vector-field model's B), n < layers-1
 *   offsets[0]     [batch, sizes[0]]; offsets[n], n >= 1: [sizes[n]]
 *   beta           [batch] per-sample beta, or NULL for the free phase
 *   target         [batch, sizes[layers-1]], or [batch, classes] with the softmax readout (read
 *                  only when beta is given)
 *   classes        0 for the squared-error nudge (inside σ if nudge_inside, else after it); else
 *                  the softmax readout's nudge, inside σ, from w_out [classes, sizes[layers-1]]
 *                  and b_out [classes]
 *   initial[n]     [batch, sizes[n]]: the starting state
 *   final[n]       [batch, sizes[n]]: receives the state after the last step (not initial's memory)
 *   alternating    0: synchronous steps; 1: alternating sweeps (even layers, then odd layers)
 *   tol            > 0: a sample stops at the first check where its residual is at most tol;
 *                  0: every sample runs `steps` steps
 *   check_every    steps between checks (>= 1); the last step is always measured
 *   residual       [batch], or NULL: receives each sample's residual at its last step
 *   taken          [batch] int64, or NULL: receives each sample's steps
 *
 * The batch is cut into `threads` slices of rows (at most MAX_THREADS, at least
 * MIN_ROWS rows each): the calling thread runs the first, the workers the
 * others (the caller also those no worker could be started for). Samples are
 * independent, so the threads never wait for each other until the end.
 *
 * Returns 0, or 1 if scratch memory could not be allocated.
 */
#define MIN_ROWS 4

int eqprop_mlp_phase(int64_t layers, const int64_t *sizes, const REAL *const *weights,
                     const REAL *const *top_down, const REAL *const *offsets, double scale,
                     int64_t core, const REAL *beta, const REAL *target, int64_t nudge_inside,
                     int64_t classes, const REAL *w_out, const REAL *b_out, const REAL *const *initial,
                     REAL *const *final, int64_t batch, int64_t steps, int64_t alternating, double tol,
                     int64_t check_every, REAL *residual, int64_t *taken, int64_t threads) {
    if (check_every < 1) check_every = 1;
    Phase phases[MAX_THREADS];
    const int64_t count = slices(batch, MIN_ROWS, threads);
    for (int64_t i = 0; i < count; i++)
        phases[i] = (Phase){layers, sizes, weights, top_down, offsets, (REAL)scale, core, beta, target,
                            nudge_inside, classes, w_out, b_out, initial, final, steps, alternating, tol,
                            check_every, residual, taken, batch * i / count, batch * (i + 1) / count, 0};
    run_parallel(run_rows, phases, sizeof(Phase), count);
    int status = 0;
    for (int64_t i = 0; i < count; i++) status |= phases[i].status;
    return status;
}

/* Rows of a product per thread, at least: fewer are not worth a thread's share of a call. */
#define MIN_PRODUCT_ROWS 8

/* Run a product's rows [0, width) in slices; returns 0, or 1 if memory ran out. */
static int run_product(void (*run)(void *), Product product, int64_t threads) {
    Product jobs[MAX_THREADS];
    const int64_t count = slices(product.width, MIN_PRODUCT_ROWS, threads);
    for (int64_t i = 0; i < count; i++) {
        jobs[i] = product;
        jobs[i].start = product.width * i / count;
        jobs[i].stop = product.width * (i + 1) / count;
    }
    run_parallel(run, jobs, sizeof(Product), count);
    int status = 0;
    for (int64_t i = 0; i < count; i++) status |= jobs[i].status;
    return status;
}

/* Run a rank update's rows [0, rows) in slices, as run_product does. */
static void run_outer_rows(Outer outer, int64_t threads) {
    Outer jobs[MAX_THREADS];
    const int64_t count = slices(outer.rows, MIN_PRODUCT_ROWS, threads);
    for (int64_t i = 0; i < count; i++) {
        jobs[i] = outer;
        jobs[i].start = outer.rows * i / count;
        jobs[i].stop = outer.rows * (i + 1) / count;
    }
    run_parallel(run_outer, jobs, sizeof(Outer), count);
}

/*
 * out = x W^T + bias: x [batch, in], weight [width, in], bias [width], out [batch, width], all
 * row-major and contiguous. Split by rows of W across `threads` threads. An input that is zero
 * in every sample of the batch adds nothing and is skipped (a third of MNIST's pixels in a batch
 * of 50: its borders): the result is the same, unless that input's weights hold inf or NaN,
 * which PyTorch would multiply by the zeros into NaN. Returns 0, or 1 if scratch memory could
 * not be allocated.
 */
int eqprop_linear(const REAL *x, const REAL *weight, const REAL *bias, REAL *out, int64_t batch,
                  int64_t width, int64_t in, int64_t threads) {
    const int64_t pad = (batch + LANES - 1) / LANES * LANES;
    REAL *xt = aligned_reals(in * pad);
    int64_t *columns = malloc((size_t)(in > 0 ? in : 1) * sizeof(int64_t));
    if (xt == NULL || columns == NULL) {
        free(xt);
        free(columns);
        return 1;
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < in; i++) {  /* x^T, its rows padded with zeros to whole vectors */
        REAL *row = xt + kept * pad;
        int zero = 1;
        for (int64_t s = 0; s < batch; s++) {
            row[s] = x[s * in + i];
            zero &= row[s] == 0;  /* NaN is not zero: kept */
        }
        for (int64_t s = batch; s < pad; s++) row[s] = 0;
        if (!zero) columns[kept++] = i;
    }
    const int status = run_product(run_linear, (Product){xt, weight, bias, out, batch, width, in, pad, columns,
                                                         kept, 0, 0, 0}, threads);
    free(columns);
    free(xt);
    return status;
}

/*
 * out = alpha left^T right: left [batch, width], right [batch, in], out [width, in], all
 * row-major and contiguous. Split by rows of out across `threads` threads. right's rows are
 * copied `pad` apart: at a stride of a power of two bytes (a 512-wide layer's 2 KiB), the same
 * columns of every sample would fall into the same few sets of the L1 cache. Returns 0, or 1
 * if scratch memory could not be allocated.
 */
int eqprop_outer(const REAL *left, const REAL *right, REAL *out, int64_t batch, int64_t width, int64_t in,
                 double alpha, int64_t threads) {
    const int64_t pad = (in + LANES - 1) / LANES * LANES + LANES;
    REAL *lt = aligned_reals(width * batch), *rows = aligned_reals(batch * pad);
    if (lt == NULL || rows == NULL) {
        free(lt);
        free(rows);
        return 1;
    }
    for (int64_t s = 0; s < batch; s++)
        for (int64_t o = 0; o < width; o++) lt[o * batch + s] = left[s * width + o];
    for (int64_t s = 0; s < batch; s++) memcpy(rows + s * pad, right + s * in, (size_t)in * sizeof(REAL));
    run_outer_rows((Outer){lt, rows, out, NULL, batch, width, in, pad, (REAL)alpha, 0, 0, 1, 0, 0, 0}, threads);
    free(rows);
    free(lt);
    return 0;
}

/* ---- continual EP and VF: a nudged phase whose weights move at every step ---------------- */

/* The bias update of a layer: g = alpha * sum over the kept samples of (after - before), as
 * run_outer's updates. */
static void bias_update(REAL *bias, REAL *total, const REAL *after, const REAL *before, const int64_t *kept,
                        int64_t count, int64_t width, REAL alpha, REAL to_total, REAL to_param) {
    for (int64_t o = 0; o < width; o++) {
        REAL sum = 0;
        for (int64_t k = 0; k < count; k++) sum += after[kept[k] * width + o] - before[kept[k] * width + o];
        const REAL g = alpha * sum;
        total[o] += g * to_total;
        if (to_param != 0) bias[o] += g * to_param;
    }
}

/* out = in^T, in being [height, width]: in tiles that stay in the L1 cache (a row-by-row
 * transpose of a 512x512 matrix misses the cache at every write) */
#define TILE 32
static void transpose(REAL *restrict out, const REAL *restrict in, int64_t height, int64_t width) {
    for (int64_t i0 = 0; i0 < height; i0 += TILE)
        for (int64_t j0 = 0; j0 < width; j0 += TILE) {
            const int64_t i1 = i0 + TILE < height ? i0 + TILE : height, j1 = j0 + TILE < width ? j0 + TILE : width;
            for (int64_t j = j0; j < j1; j++)
                for (int64_t i = i0; i < i1; i++) out[j * height + i] = in[i * width + j];
        }
}

/* offset = (constant - shift) * scale, or the constant itself for scale 1 and shift 0 (as
 * PMLP.clamped_from_drive folds the activation into the offsets) */
static void fold(REAL *offset, const REAL *constant, int64_t count, REAL scale, REAL shift) {
    for (int64_t i = 0; i < count; i++)
        offset[i] = scale == 1 && shift == 0 ? constant[i] : (constant[i] - shift) * scale;
}

/*
 * The nudged phase of continual EP (rule_vf 0) or continual VF (rule_vf 1) on a P-MLP or
 * VF-MLP with the squared-error nudge, the first layer telescoped (the Python path:
 * eqprop.estimators.continual.telescoped_first_layer, whose docstring gives the rules). For
 * t = 0 .. steps-1: one step of eqprop_mlp_phase from the current weights, then every layer
 * n >= 1 moves (W_n, b_n, and for VF the backward matrices B_m), then the first layer's drive
 * becomes drive0 + mixing (s^0_{t+1} - s^0_0) (keep-masked) and every offset is refolded.
 *
 *   weights[n], biases[n]  W_n [sizes[n], sizes[n-1]] and b_n, n >= 1: moved in place
 *   top_down[n]            as in eqprop_mlp_phase, n < layers-1: W_{n+1} itself (EP: it moves with
 *                          it) or, for VF, B_{n+1}^T, kept equal to backward[n+1] transposed
 *   backward[m]            VF: B_m [sizes[m-1], sizes[m]], m >= 1, moved in place; NULL for EP
 *   state[n]               [batch, sizes[n]]: s_0 in, s_steps out
 *   drive0                 [batch, sizes[0]]: the first layer's drive W_1 x + b_1 at t = 0
 *   mixing                 [batch, batch] or NULL (the first layer does not move)
 *   keep                   [batch] 1 or 0: the samples whose steps update the weights; NULL: all
 *   rate_*[n]              lr / beta of each matrix and bias (0: frozen); total_*[n] += update / beta
 *
 * Returns 0, or 1 if scratch memory could not be allocated.
 */
int eqprop_continual_phase(int64_t layers, const int64_t *sizes, REAL *const *weights, REAL *const *biases,
                           REAL *const *top_down, REAL *const *backward, double scale, double shift,
                           int64_t core, const REAL *beta, const REAL *target, int64_t nudge_inside,
                           REAL *const *state, const REAL *drive0, const REAL *mixing, const REAL *keep,
                           int64_t batch, int64_t steps, int64_t rule_vf, const double *rate_w,
                           const double *rate_b, const double *rate_back, double inv_beta,
                           REAL *const *total_w, REAL *const *total_b, REAL *const *total_back,
                           int64_t threads) {
    const REAL k = (REAL)scale, c = (REAL)shift, alpha = (REAL)1 / (REAL)batch, to_total = (REAL)inv_beta;
    int64_t widest = 0, units = 0;
    for (int64_t n = 0; n < layers; n++) {
        widest = sizes[n] > widest ? sizes[n] : widest;
        units += sizes[n];
    }
    const int64_t first = batch * sizes[0];
    /* the rows of a step's b are `padded` apart: a stride of a power of two bytes (a 512-wide layer's
     * 2 KiB) would put the same columns of every row into the same few sets of the L1 cache */
    const int64_t padded = (widest + LANES - 1) / LANES * LANES + LANES;
    REAL *pool = aligned_reals(batch * units + 4 * first + units + 2 * batch * (widest + padded));
    REAL **buffers = malloc(3 * (size_t)layers * sizeof(REAL *));
    int64_t *kept = malloc((size_t)(batch > 0 ? batch : 1) * sizeof(int64_t));
    if (pool == NULL || buffers == NULL || kept == NULL) {
        free(pool);
        free(buffers);
        free(kept);
        return 1;
    }
    REAL **current = buffers, **next = buffers + layers, **offsets = buffers + 2 * layers;
    REAL *free_pool = pool;
    for (int64_t n = 0; n < layers; n++) {
        current[n] = state[n];
        next[n] = free_pool;
        free_pool += batch * sizes[n];
    }
    REAL *start = free_pool, *drive = start + first, *change = drive + first;
    offsets[0] = change + first;
    free_pool = offsets[0] + first;
    for (int64_t n = 1; n < layers; n++) {
        offsets[n] = free_pool;
        free_pool += sizes[n];
    }
    REAL *lt = free_pool, *rows = lt + 2 * batch * widest;   /* a step's a^T and b, 2 batch samples at most */
    memcpy(start, state[0], (size_t)first * sizeof(REAL));
    memcpy(drive, drive0, (size_t)first * sizeof(REAL));
    fold(offsets[0], drive, first, k, c);
    for (int64_t n = 1; n < layers; n++) fold(offsets[n], biases[n], sizes[n], k, c);
    int64_t count = 0;
    for (int64_t b = 0; b < batch; b++)
        if (keep == NULL || keep[b] != 0) kept[count++] = b;
    int status = 0;
    for (int64_t t = 0; t < steps; t++) {
        status = eqprop_mlp_phase(layers, sizes, (const REAL *const *)weights, (const REAL *const *)top_down,
                                  (const REAL *const *)offsets, scale, core, beta, target, nudge_inside, 0, NULL,
                                  NULL, (const REAL *const *)current, next, batch, 1, 0, 0.0, 1, NULL, NULL,
                                  threads);
        if (status != 0) break;
        for (int64_t n = 1; n < layers; n++) {
            const int64_t width = sizes[n], in = sizes[n - 1];
            const int64_t samples = rule_vf ? count : 2 * count;
            if (rule_vf) {   /* (s^n_{t+1} - s^n_t) (s^{n-1}_t)^T */
                for (int64_t j = 0; j < count; j++) {
                    const int64_t b = kept[j];
                    for (int64_t o = 0; o < width; o++)
                        lt[o * count + j] = next[n][b * width + o] - current[n][b * width + o];
                    memcpy(rows + j * padded, current[n - 1] + b * in, (size_t)in * sizeof(REAL));
                }
            } else {         /* s^n_{t+1} (s^{n-1}_{t+1})^T - s^n_t (s^{n-1}_t)^T */
                for (int64_t j = 0; j < count; j++) {
                    const int64_t b = kept[j];
                    for (int64_t o = 0; o < width; o++) {
                        lt[o * samples + j] = next[n][b * width + o];
                        lt[o * samples + count + j] = -current[n][b * width + o];
                    }
                    memcpy(rows + j * padded, next[n - 1] + b * in, (size_t)in * sizeof(REAL));
                    memcpy(rows + (count + j) * padded, current[n - 1] + b * in, (size_t)in * sizeof(REAL));
                }
            }
            REAL *moved = rate_w[n] != 0 ? weights[n] : NULL;   /* a frozen matrix only counts */
            run_outer_rows((Outer){lt, rows, total_w[n], moved, samples, width, in, padded, alpha, to_total,
                                   (REAL)rate_w[n], 0, 0, 0, 0}, threads);
            bias_update(biases[n], total_b[n], next[n], current[n], kept, count, width, alpha, to_total,
                        (REAL)rate_b[n]);
        }
        if (rule_vf)   /* B_m: (s^{m-1}_{t+1} - s^{m-1}_t) (s^m_t)^T, then its transpose for the steps */
            for (int64_t m = 1; m < layers; m++) {
                const int64_t height = sizes[m - 1], width = sizes[m];
                for (int64_t j = 0; j < count; j++) {
                    const int64_t b = kept[j];
                    for (int64_t i = 0; i < height; i++)
                        lt[i * count + j] = next[m - 1][b * height + i] - current[m - 1][b * height + i];
                    memcpy(rows + j * padded, current[m] + b * width, (size_t)width * sizeof(REAL));
                }
                REAL *moved = rate_back[m] != 0 ? backward[m] : NULL;
                run_outer_rows((Outer){lt, rows, total_back[m], moved, count, height, width, padded, alpha, to_total,
                                       (REAL)rate_back[m], 0, 0, 0, 0}, threads);
                transpose(top_down[m - 1], backward[m], height, width);
            }
        /* the telescoped first layer: Δ_t = keep (s^0_{t+1} - s^0_0), drive = drive0 + mixing Δ_t */
        for (int64_t b = 0; b < batch; b++)
            for (int64_t i = 0; i < sizes[0]; i++)
                change[b * sizes[0] + i] = (next[0][b * sizes[0] + i] - start[b * sizes[0] + i]) *
                                           (keep == NULL ? (REAL)1 : keep[b]);
        if (mixing != NULL) {
            for (int64_t b = 0; b < batch; b++) {
                REAL *d = drive + b * sizes[0];
                for (int64_t i = 0; i < sizes[0]; i++) d[i] = 0;
                for (int64_t j = 0; j < batch; j++) {
                    const REAL m = mixing[b * batch + j];
                    const REAL *delta = change + j * sizes[0];
                    for (int64_t i = 0; i < sizes[0]; i++) d[i] += m * delta[i];
                }
                for (int64_t i = 0; i < sizes[0]; i++) d[i] += drive0[b * sizes[0] + i];
            }
            fold(offsets[0], drive, first, k, c);
        }
        for (int64_t n = 1; n < layers; n++) fold(offsets[n], biases[n], sizes[n], k, c);
        for (int64_t n = 0; n < layers; n++) {
            REAL *swap = current[n];
            current[n] = next[n];
            next[n] = swap;
        }
    }
    for (int64_t n = 0; n < layers; n++)   /* s_steps into the caller's state */
        if (current[n] != state[n]) memcpy(state[n], current[n], (size_t)(batch * sizes[n]) * sizeof(REAL));
    free(kept);
    free(buffers);
    free(pool);
    return status;
}
