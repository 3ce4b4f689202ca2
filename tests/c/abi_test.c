/*
 * C ABI test: exercises every function of include/partialfc.h from C.
 *
 * Compiled by tests/all/c_program.rs both as C11 and as C++17:
 *   cc  -std=c11   -Wall -Wextra -Werror -pedantic    -I include tests/c/abi_test.c -L<lib> -lpartialfc -Wl,-rpath,<lib> -lm
 *   c++ -x c++ -std=c++17 -Wall -Wextra -Werror       (same)
 * Exits 0 and prints "c abi: N checks passed" on success; prints the failed check and exits 1 otherwise.
 */
/* mkdtemp, opendir and unlink for the checkpoint and export tests' scratch directory. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "partialfc.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned checks_passed = 0;

static const char *status_name(pfc_status s) {
    switch (s) {
        case PFC_OK: return "PFC_OK";
        case PFC_ERR_NULL_ARGUMENT: return "PFC_ERR_NULL_ARGUMENT";
        case PFC_ERR_INVALID_ARGUMENT: return "PFC_ERR_INVALID_ARGUMENT";
        case PFC_ERR_OUT_OF_MEMORY: return "PFC_ERR_OUT_OF_MEMORY";
        case PFC_ERR_UNAVAILABLE: return "PFC_ERR_UNAVAILABLE";
        case PFC_ERR_DEVICE: return "PFC_ERR_DEVICE";
        case PFC_ERR_COMMUNICATION: return "PFC_ERR_COMMUNICATION";
        case PFC_ERR_IO: return "PFC_ERR_IO";
        case PFC_ERR_CORRUPT: return "PFC_ERR_CORRUPT";
        case PFC_ERR_INCOMPATIBLE: return "PFC_ERR_INCOMPATIBLE";
        case PFC_ERR_PANIC: return "PFC_ERR_PANIC";
        case PFC_ERR_NON_FINITE: return "PFC_ERR_NON_FINITE";
        default: return "unknown status";
    }
}

static const char *last_error(void) {
    static char buf[1024];
    pfc_last_error(buf, sizeof buf);
    return buf;
}

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "c abi: FAILED at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                  \
        }                                                                             \
        checks_passed++;                                                              \
    } while (0)

/* Expects `call` to return `want`; on a mismatch prints both statuses and the library's message. */
#define EXPECT_STATUS(call, want)                                                          \
    do {                                                                                   \
        pfc_status got_ = (call);                                                          \
        if (got_ != (want)) {                                                              \
            fprintf(stderr, "c abi: FAILED at %s:%d: %s returned %s (%d), expected %s; last error: %s\n", \
                    __FILE__, __LINE__, #call, status_name(got_), (int)got_, status_name(want),   \
                    last_error());                                                         \
            exit(1);                                                                       \
        }                                                                                  \
        checks_passed++;                                                                   \
    } while (0)

#define EXPECT_OK(call) EXPECT_STATUS(call, PFC_OK)

/* Expects an error with a non-empty message that mentions `needle`. */
#define EXPECT_ERROR(call, want, needle)                                                   \
    do {                                                                                   \
        EXPECT_STATUS(call, want);                                                         \
        const char *msg_ = last_error();                                                   \
        if (msg_[0] == '\0' || strstr(msg_, (needle)) == NULL) {                            \
            fprintf(stderr, "c abi: FAILED at %s:%d: message of %s is \"%s\", expected it to mention \"%s\"\n", \
                    __FILE__, __LINE__, #call, msg_, (needle));                            \
            exit(1);                                                                       \
        }                                                                                  \
        checks_passed++;                                                                   \
    } while (0)

/* ---------------------------------------------------------------------------------------------- */
/* IEEE 754 binary16 conversion (round to nearest, ties to even).                                  */

static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xffu) { /* Inf or NaN (kept quiet) */
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    }
    int e = (int)exp - 127 + 15;
    if (e >= 31) { /* overflow to Inf */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (e <= 0) { /* subnormal or zero */
        if (e < -10) {
            return (uint16_t)sign;
        }
        mant |= 0x800000u;
        unsigned shift = (unsigned)(14 - e);
        uint32_t h = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (h & 1u))) {
            h++;
        }
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        h++; /* a carry into the exponent is still correct, up to Inf */
    }
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exp = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mant = (uint32_t)h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        float v = (float)mant * (1.0f / 16777216.0f); /* mant × 2^-24 */
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---------------------------------------------------------------------------------------------- */
/* The synthetic problem: C classes with random prototypes, noisy embeddings, two local shards.     */

#define C 12
#define D 16
#define SHARDS 2
#define N 10
static const uint64_t ROWS[SHARDS] = {7, 3}; /* uneven on purpose */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float uniform(void) { /* in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffffu) / 8388608.0f - 1.0f;
}

static float prototypes[C][D];
static float emb[N * D];
static int64_t labels[N];

static void make_problem(void) {
    for (int c = 0; c < C; c++) {
        for (int j = 0; j < D; j++) {
            prototypes[c][j] = uniform();
        }
    }
    for (int i = 0; i < N; i++) {
        labels[i] = (int64_t)((i * 5 + 1) % C);
        for (int j = 0; j < D; j++) {
            emb[i * D + j] = 3.0f * (prototypes[labels[i]][j] + 0.3f * uniform());
        }
    }
}

static void base_config(pfc_config *cfg) {
    pfc_config_init(cfg);
    cfg->num_classes = C;
    cfg->embedding_dim = D;
    cfg->local_shards = SHARDS;
    cfg->seed = 7;
    cfg->scale = 16.0f;
    cfg->m2 = 0.2f;
    cfg->lr = 0.5f;
}

/* Fills `b` with one batch per shard over `e`/`g` (f32 or f16 storage of element size `elem`). */
static void make_batches(pfc_batch b[SHARDS], const void *e, void *g, int32_t dtype, size_t elem) {
    uint64_t at = 0;
    for (int s = 0; s < SHARDS; s++) {
        memset(&b[s], 0, sizeof b[s]);
        b[s].embeddings = (const char *)e + at * D * elem;
        b[s].labels = labels + at;
        b[s].grad_embeddings = g == NULL ? NULL : (char *)g + at * D * elem;
        b[s].batch_size = ROWS[s];
        b[s].dtype = dtype;
        b[s].memory = PFC_MEMORY_HOST;
        b[s].stream = NULL;
        at += ROWS[s];
    }
}

static void get_all_centers(const pfc_head *h, float *out) {
    uint64_t first = 99, count = 99;
    EXPECT_OK(pfc_local_classes(h, &first, &count));
    CHECK(first == 0 && count == C);
    EXPECT_OK(pfc_get_centers(h, first, count, 0, out));
}

static int bytes_all(const void *p, size_t n, unsigned char value) {
    for (size_t i = 0; i < n; i++) {
        if (((const unsigned char *)p)[i] != value) {
            return 0;
        }
    }
    return 1;
}

static int all_finite(const float *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(v[i])) {
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------------- */

static void test_version_and_config(void) {
    const char *v = pfc_version();
    CHECK(v != NULL);
    CHECK(v[0] >= '0' && v[0] <= '9');
    CHECK(strchr(v, '.') != NULL);
    CHECK(pfc_version() == v); /* a static string */
    {
        /* The header's version macros name the library it is linked with. */
        char from_macros[64];
        snprintf(from_macros, sizeof from_macros, "%d.%d.%d", PFC_VERSION_MAJOR, PFC_VERSION_MINOR, PFC_VERSION_PATCH);
        CHECK(strcmp(v, from_macros) == 0);
    }

    pfc_config_init(NULL); /* a no-op */
    pfc_config cfg;
    memset(&cfg, 0xab, sizeof cfg);
    pfc_config_init(&cfg);
    CHECK(cfg.struct_size == sizeof(pfc_config));
    CHECK(cfg.scale == 64.0f && cfg.m1 == 1.0f && cfg.m2 == 0.5f && cfg.m3 == 0.0f);
    CHECK(cfg.sample_rate == 1.0f);
    CHECK(cfg.optimizer == PFC_OPTIMIZER_SGD && cfg.lr == 0.1f && cfg.momentum == 0.9f);
    CHECK(cfg.weight_decay == 5e-4f);
    CHECK(cfg.beta1 == 0.9f && cfg.beta2 == 0.999f && cfg.eps == 1e-8f);
    CHECK(cfg.init_std == 0.01f);
    CHECK(cfg.compute_dtype == PFC_DTYPE_F32 && cfg.backend == PFC_BACKEND_CPU);
    CHECK(cfg.margin_grad == PFC_MARGIN_GRAD_STRAIGHT_THROUGH && cfg.arcface_fallback == 0);
    CHECK(cfg.local_shards == 1 && cfg.devices == NULL && cfg.world_size == 0 && cfg.nccl_id == NULL);
    CHECK(PFC_NCCL_ID_BYTES == 128);
}

static void test_half_conversion(void) {
    CHECK(f32_to_f16(1.0f) == 0x3c00u);
    CHECK(f32_to_f16(-2.0f) == 0xc000u);
    CHECK(f32_to_f16(0.1f) == 0x2e66u);
    CHECK(f32_to_f16(65504.0f) == 0x7bffu);
    CHECK(f32_to_f16(1e6f) == 0x7c00u);
    CHECK(f32_to_f16(5.9604645e-8f) == 0x0001u);
    CHECK(f32_to_f16(1e-9f) == 0x0000u);
    CHECK(f16_to_f32(0x3555u) > 0.333f && f16_to_f32(0x3555u) < 0.334f);
    int round_trips_ok = 1;
    for (int i = 0; i < 1000; i++) {
        float x = 4.0f * uniform();
        float back = f16_to_f32(f32_to_f16(x));
        round_trips_ok &= fabsf(back - x) <= fabsf(x) * (1.0f / 2048.0f) + 1e-7f;
    }
    CHECK(round_trips_ok);
}

static void test_last_error(void) {
    /* Provoke a known message: a NULL head. */
    EXPECT_ERROR(pfc_set_learning_rate(NULL, 0.1f), PFC_ERR_NULL_ARGUMENT, "head");
    size_t len = pfc_last_error(NULL, 0);
    CHECK(len > 4);
    CHECK(pfc_last_error(NULL, 100) == len); /* NULL buffer: only the length */

    char full[512];
    CHECK(len < sizeof full);
    CHECK(pfc_last_error(full, sizeof full) == len);
    CHECK(strlen(full) == len);

    char buf[8];
    memset(buf, 'x', sizeof buf);
    CHECK(pfc_last_error(buf, 0) == len); /* cap 0 writes nothing */
    CHECK(buf[0] == 'x');

    memset(buf, 'x', sizeof buf);
    CHECK(pfc_last_error(buf, 5) == len); /* full length returned, 4 bytes + NUL written */
    CHECK(buf[4] == '\0' && memcmp(buf, full, 4) == 0);
    CHECK(buf[5] == 'x');

    memset(buf, 'x', sizeof buf);
    CHECK(pfc_last_error(buf, 1) == len);
    CHECK(buf[0] == '\0' && buf[1] == 'x');

    char exact[512];
    CHECK(pfc_last_error(exact, len + 1) == len);
    CHECK(strcmp(exact, full) == 0);
}

static void test_create_errors(void) {
    pfc_config cfg;
    pfc_head *h = (pfc_head *)&cfg; /* a sentinel that must survive failed creates */
    pfc_head *const sentinel = h;

    base_config(&cfg);
    EXPECT_ERROR(pfc_create(NULL, &h), PFC_ERR_NULL_ARGUMENT, "cfg");
    EXPECT_ERROR(pfc_create(&cfg, NULL), PFC_ERR_NULL_ARGUMENT, "out");

    cfg.struct_size += 8; /* a newer header's struct */
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_INCOMPATIBLE, "struct_size");
    CHECK(h == sentinel);
    cfg.struct_size -= 12; /* no header's */
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_INCOMPATIBLE, "struct_size");
    CHECK(h == sentinel);
    /* The first release's struct ended before world_size: the fields after it take their defaults. */
    base_config(&cfg);
    cfg.struct_size = (uint32_t)offsetof(pfc_config, world_size);
    cfg.world_size = 1234567;
    EXPECT_OK(pfc_create(&cfg, &h));
    pfc_destroy(h);
    h = sentinel;

    base_config(&cfg);
    cfg.backend = PFC_BACKEND_CUDA;
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_UNAVAILABLE, "CUDA");
    CHECK(h == sentinel);

    base_config(&cfg);
    cfg.num_classes = 0;
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_INVALID_ARGUMENT, "num_classes");
    CHECK(h == sentinel);

    base_config(&cfg);
    cfg.sample_rate = 0.0f;
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_INVALID_ARGUMENT, "sample_rate");

    base_config(&cfg);
    cfg.optimizer = 7;
    EXPECT_ERROR(pfc_create(&cfg, &h), PFC_ERR_INVALID_ARGUMENT, "optimizer");
    CHECK(h == sentinel);

    pfc_destroy(NULL); /* a no-op */
}

/* Trains a few steps, checks stats, evaluation, learning-rate control and error behaviour. */
static void test_training(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    CHECK(h != NULL);

    uint64_t first = 77, count = 77;
    EXPECT_OK(pfc_local_classes(h, &first, &count));
    CHECK(first == 0 && count == C);

    static float grad[N * D];
    static float before[C * D], after[C * D];
    pfc_batch b[SHARDS];
    make_batches(b, emb, grad, PFC_DTYPE_F32, sizeof(float));

    /* Evaluation: loss over all classes, nothing changes, the step counter stays at 0. */
    pfc_step_stats ev;
    memset(&ev, 0, sizeof ev);
    get_all_centers(h, before);
    EXPECT_OK(pfc_evaluate(h, b, SHARDS, &ev));
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0);
    CHECK(ev.step == 0 && ev.global_batch == N && ev.sampled_classes == C);
    CHECK(isfinite(ev.loss) && ev.loss > 0.0);
    CHECK(ev.accuracy >= 0.0 && ev.accuracy <= 1.0);

    double first_loss = 0.0, last_loss = 0.0;
    const int steps = 8;
    for (int t = 0; t < steps; t++) {
        pfc_step_stats st;
        memset(&st, 0, sizeof st);
        memset(grad, 0, sizeof grad);
        EXPECT_OK(pfc_train_step(h, b, SHARDS, &st));
        CHECK(st.step == (uint64_t)t + 1);
        CHECK(st.global_batch == N);
        CHECK(st.sampled_classes == C); /* sample_rate 1: every class */
        CHECK(isfinite(st.loss) && st.loss > 0.0);
        CHECK(st.accuracy >= 0.0 && st.accuracy <= 1.0);
        CHECK(all_finite(grad, N * D));
        /* Both shards' rows received a gradient. */
        double n0 = 0.0, n1 = 0.0;
        for (int k = 0; k < (int)ROWS[0] * D; k++) n0 += fabs(grad[k]);
        for (int k = (int)ROWS[0] * D; k < N * D; k++) n1 += fabs(grad[k]);
        CHECK(n0 > 0.0 && n1 > 0.0);
        if (t == 0) {
            first_loss = st.loss;
            CHECK(fabs(st.loss - ev.loss) < 1e-3 * ev.loss); /* the same centers, the same loss */
        }
        last_loss = st.loss;
    }
    CHECK(last_loss < 0.8 * first_loss);

    /* The evaluation agrees that training helped. */
    pfc_step_stats ev2;
    EXPECT_OK(pfc_evaluate(h, b, SHARDS, &ev2));
    CHECK(ev2.loss < ev.loss && ev2.step == (uint64_t)steps);
    CHECK(ev2.accuracy >= ev.accuracy);
    /* Evaluation ignores grad_embeddings; NULL is fine. stats may be NULL too. */
    make_batches(b, emb, NULL, PFC_DTYPE_F32, sizeof(float));
    EXPECT_OK(pfc_evaluate(h, b, SHARDS, NULL));
    make_batches(b, emb, grad, PFC_DTYPE_F32, sizeof(float));

    /* A label out of range: PFC_ERR_INVALID_ARGUMENT, centers, gradient and stats untouched. */
    get_all_centers(h, before);
    labels[N - 1] = C;
    pfc_step_stats sentinel_stats;
    memset(&sentinel_stats, 0x5a, sizeof sentinel_stats);
    pfc_step_stats st = sentinel_stats;
    memset(grad, 0x7f, sizeof grad);
    EXPECT_ERROR(pfc_train_step(h, b, SHARDS, &st), PFC_ERR_INVALID_ARGUMENT, "label");
    CHECK(memcmp(&st, &sentinel_stats, sizeof st) == 0);
    CHECK(bytes_all(grad, sizeof grad, 0x7f));
    labels[N - 1] = -1;
    EXPECT_ERROR(pfc_train_step(h, b, SHARDS, &st), PFC_ERR_INVALID_ARGUMENT, "label");
    EXPECT_ERROR(pfc_evaluate(h, b, SHARDS, &st), PFC_ERR_INVALID_ARGUMENT, "label");
    labels[N - 1] = (int64_t)(((N - 1) * 5 + 1) % C);
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0);

    /* NaN embedding. */
    float saved = emb[3];
    emb[3] = NAN;
    EXPECT_ERROR(pfc_train_step(h, b, SHARDS, &st), PFC_ERR_INVALID_ARGUMENT, "NaN");
    emb[3] = saved;

    /* Batch count other than local_shards; NULL batches; NULL head. */
    EXPECT_STATUS(pfc_train_step(h, b, 1, &st), PFC_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR(pfc_train_step(h, NULL, SHARDS, &st), PFC_ERR_NULL_ARGUMENT, "batches");
    EXPECT_ERROR(pfc_train_step(NULL, b, SHARDS, &st), PFC_ERR_NULL_ARGUMENT, "head");
    EXPECT_ERROR(pfc_evaluate(NULL, b, SHARDS, &st), PFC_ERR_NULL_ARGUMENT, "head");
    EXPECT_ERROR(pfc_local_classes(NULL, &first, &count), PFC_ERR_NULL_ARGUMENT, "head");
    EXPECT_ERROR(pfc_get_centers(NULL, 0, 1, 0, after), PFC_ERR_NULL_ARGUMENT, "head");
    EXPECT_ERROR(pfc_set_centers(NULL, 0, 1, after), PFC_ERR_NULL_ARGUMENT, "head");
    CHECK(memcmp(&st, &sentinel_stats, sizeof st) == 0);
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0);

    /* One shard may have an empty batch (NULL pointers allowed there). stats may be NULL. */
    pfc_batch lopsided[SHARDS];
    make_batches(lopsided, emb, grad, PFC_DTYPE_F32, sizeof(float));
    lopsided[0].batch_size = N;
    lopsided[1].batch_size = 0;
    lopsided[1].embeddings = NULL;
    lopsided[1].labels = NULL;
    lopsided[1].grad_embeddings = NULL;
    EXPECT_OK(pfc_train_step(h, lopsided, SHARDS, &st));
    CHECK(st.global_batch == N && st.step == (uint64_t)steps + 1);
    EXPECT_OK(pfc_train_step(h, b, SHARDS, NULL));

    /* Learning rate 0: a step leaves the centers bit-identical (SGD: W -= lr·buf). */
    EXPECT_OK(pfc_set_learning_rate(h, 0.0f));
    get_all_centers(h, before);
    EXPECT_OK(pfc_train_step(h, b, SHARDS, &st));
    CHECK(st.step == (uint64_t)steps + 3);
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0);
    EXPECT_ERROR(pfc_set_learning_rate(h, NAN), PFC_ERR_INVALID_ARGUMENT, "learning rate");
    EXPECT_ERROR(pfc_set_learning_rate(h, -1.0f), PFC_ERR_INVALID_ARGUMENT, "learning rate");
    /* The failed calls kept lr = 0. */
    EXPECT_OK(pfc_train_step(h, b, SHARDS, &st));
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0);
    EXPECT_OK(pfc_set_learning_rate(h, 0.25f));
    EXPECT_OK(pfc_train_step(h, b, SHARDS, &st));
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) != 0);

    pfc_destroy(h);
}

/* The step split: compute (gradients out, center gradients accumulated), apply, discard. */
static void test_step_split(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h = NULL, *ref = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    EXPECT_OK(pfc_create(&cfg, &ref));
    static float grad[N * D], grad_ref[N * D];
    static float before[C * D], after[C * D];
    pfc_batch b[SHARDS], r[SHARDS];
    make_batches(b, emb, grad, PFC_DTYPE_F32, sizeof(float));
    make_batches(r, emb, grad_ref, PFC_DTYPE_F32, sizeof(float));
    EXPECT_ERROR(pfc_train_apply(h), PFC_ERR_INVALID_ARGUMENT, "pfc_train_compute");
    get_all_centers(h, before);
    pfc_step_stats st, st_ref;
    EXPECT_OK(pfc_train_compute(h, b, SHARDS, &st));
    CHECK(st.step == 0);
    get_all_centers(h, after);
    CHECK(memcmp(before, after, sizeof before) == 0); /* compute changes no center */
    EXPECT_OK(pfc_train_discard(h));
    EXPECT_ERROR(pfc_train_apply(h), PFC_ERR_INVALID_ARGUMENT, "pfc_train_compute");
    EXPECT_OK(pfc_train_compute(h, b, SHARDS, &st));
    EXPECT_OK(pfc_train_apply(h));
    EXPECT_OK(pfc_train_step(ref, r, SHARDS, &st_ref));
    CHECK(st.loss == st_ref.loss && memcmp(grad, grad_ref, sizeof grad) == 0);
    get_all_centers(h, before);
    get_all_centers(ref, after);
    CHECK(memcmp(before, after, sizeof before) == 0); /* compute + apply = train_step */
    EXPECT_STATUS(pfc_train_apply(NULL), PFC_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(pfc_train_discard(NULL), PFC_ERR_NULL_ARGUMENT);
    CHECK(PFC_ERR_NON_FINITE == 11);
    pfc_destroy(h);
    pfc_destroy(ref);
}

static void test_centers(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));

    static float w[C * D], w2[C * D], part[4 * D], unit[C * D];
    get_all_centers(h, w);
    CHECK(all_finite(w, C * D));
    /* Initialised N(0, 0.01²): small, not all zero. */
    double sq = 0.0;
    for (int k = 0; k < C * D; k++) sq += (double)w[k] * w[k];
    double std = sqrt(sq / (C * D));
    CHECK(std > 0.005 && std < 0.02);

    /* A sub-range spanning the shard boundary (shards own [0, 6) and [6, 12)). */
    EXPECT_OK(pfc_get_centers(h, 4, 4, 0, part));
    CHECK(memcmp(part, w + 4 * D, sizeof part) == 0);

    /* Normalized rows have unit norm and the direction of the raw rows. */
    EXPECT_OK(pfc_get_centers(h, 0, C, 1, unit));
    for (int c = 0; c < C; c++) {
        double n = 0.0, raw = 0.0;
        for (int j = 0; j < D; j++) {
            n += (double)unit[c * D + j] * unit[c * D + j];
            raw += (double)w[c * D + j] * w[c * D + j];
        }
        CHECK(fabs(n - 1.0) < 1e-5);
        CHECK(fabs(unit[c * D] - w[c * D] / sqrt(raw)) < 1e-5);
    }

    /* Warm start: set the prototypes as centers, read them back exactly. */
    EXPECT_OK(pfc_set_centers(h, 0, C, &prototypes[0][0]));
    get_all_centers(h, w2);
    CHECK(memcmp(w2, prototypes, sizeof w2) == 0);
    for (int k = 0; k < 4 * D; k++) part[k] = (float)k;
    EXPECT_OK(pfc_set_centers(h, 4, 4, part));
    get_all_centers(h, w2);
    CHECK(memcmp(w2 + 4 * D, part, sizeof part) == 0);
    CHECK(memcmp(w2, prototypes, 4 * D * sizeof(float)) == 0);
    CHECK(memcmp(w2 + 8 * D, &prototypes[8][0], 4 * D * sizeof(float)) == 0);

    /* Errors: nothing read or written. */
    memset(part, 0x11, sizeof part);
    EXPECT_ERROR(pfc_get_centers(h, C - 1, 2, 0, part), PFC_ERR_INVALID_ARGUMENT, "class");
    EXPECT_STATUS(pfc_get_centers(h, 0, 0, 0, part), PFC_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR(pfc_get_centers(h, 0, 1, 2, part), PFC_ERR_INVALID_ARGUMENT, "normalized");
    EXPECT_ERROR(pfc_get_centers(h, 0, 1, 0, NULL), PFC_ERR_NULL_ARGUMENT, "out");
    CHECK(bytes_all(part, sizeof part, 0x11));

    float bad[2 * D];
    for (int k = 0; k < 2 * D; k++) bad[k] = 1.0f;
    bad[2 * D - 1] = INFINITY;
    EXPECT_ERROR(pfc_set_centers(h, 0, 2, bad), PFC_ERR_INVALID_ARGUMENT, "NaN");
    EXPECT_STATUS(pfc_set_centers(h, C, 1, bad), PFC_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR(pfc_set_centers(h, 0, 1, NULL), PFC_ERR_NULL_ARGUMENT, "in");
    static float w3[C * D];
    get_all_centers(h, w3);
    CHECK(memcmp(w2, w3, sizeof w3) == 0);

    /* pfc_local_classes writes nothing when one output is NULL. */
    uint64_t first = 4242, count = 4242;
    EXPECT_ERROR(pfc_local_classes(h, NULL, &count), PFC_ERR_NULL_ARGUMENT, "first");
    CHECK(count == 4242);
    EXPECT_ERROR(pfc_local_classes(h, &first, NULL), PFC_ERR_NULL_ARGUMENT, "count");
    CHECK(first == 4242);

    pfc_destroy(h);
}

/* The adaptive margins' running statistics: read, moved by a step, restored by the host, refused
   when malformed (nothing changes then). */
static void test_margin_state(void) {
    pfc_config cfg, defaults;
    base_config(&cfg);
    pfc_config_init(&defaults);
    cfg.m2 = defaults.m2; /* the combined margin's options stay at their defaults beside AdaFace */
    cfg.margin_kind = PFC_MARGIN_ADAFACE;
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    float state[4] = {0};
    uint32_t len = 0;
    EXPECT_OK(pfc_margin_state(h, state, 4, &len));
    CHECK(len == 2 && state[0] == 20.0f && state[1] == 100.0f);
    static float grad[N * D];
    pfc_batch b[SHARDS];
    make_batches(b, emb, grad, PFC_DTYPE_F32, sizeof(float));
    pfc_step_stats st;
    EXPECT_OK(pfc_train_step(h, b, SHARDS, &st));
    float moved[2] = {0};
    EXPECT_OK(pfc_margin_state(h, moved, 2, &len));
    CHECK(moved[0] != 20.0f && moved[1] != 100.0f);
    const float saved[2] = {20.0f, 100.0f};
    EXPECT_OK(pfc_set_margin_state(h, saved, 2));
    EXPECT_OK(pfc_margin_state(h, state, 2, &len));
    CHECK(len == 2 && state[0] == 20.0f && state[1] == 100.0f);
    const float nan_state[2] = {NAN, 1.0f};
    EXPECT_ERROR(pfc_set_margin_state(h, nan_state, 2), PFC_ERR_INVALID_ARGUMENT, "finite");
    EXPECT_ERROR(pfc_set_margin_state(h, moved, 1), PFC_ERR_INVALID_ARGUMENT, "2");
    EXPECT_ERROR(pfc_set_margin_state(h, NULL, 2), PFC_ERR_NULL_ARGUMENT, "values");
    EXPECT_STATUS(pfc_set_margin_state(NULL, moved, 2), PFC_ERR_NULL_ARGUMENT);
    EXPECT_OK(pfc_margin_state(h, state, 2, &len));
    CHECK(state[0] == 20.0f && state[1] == 100.0f);
    pfc_destroy(h);

    /* The combined margin keeps none: the empty list is its only state. */
    base_config(&cfg);
    EXPECT_OK(pfc_create(&cfg, &h));
    EXPECT_OK(pfc_margin_state(h, NULL, 0, &len));
    CHECK(len == 0);
    EXPECT_OK(pfc_set_margin_state(h, NULL, 0));
    EXPECT_ERROR(pfc_set_margin_state(h, saved, 1), PFC_ERR_INVALID_ARGUMENT, "0");
    pfc_destroy(h);
}

/* f16 embeddings and gradients through uint16_t buffers, compared with f32 on an identical head. */
static void test_f16(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h32 = NULL, *h16 = NULL;
    EXPECT_OK(pfc_create(&cfg, &h32));
    EXPECT_OK(pfc_create(&cfg, &h16));

    static uint16_t emb16[N * D], grad16[N * D];
    static float emb_rounded[N * D], grad32[N * D];
    for (int k = 0; k < N * D; k++) {
        emb16[k] = f32_to_f16(emb[k]);
        emb_rounded[k] = f16_to_f32(emb16[k]); /* the exact values the f16 head sees */
    }
    pfc_batch b16[SHARDS], b32[SHARDS];
    make_batches(b16, emb16, grad16, PFC_DTYPE_F16, sizeof(uint16_t));
    make_batches(b32, emb_rounded, grad32, PFC_DTYPE_F32, sizeof(float));

    for (int t = 0; t < 3; t++) {
        pfc_step_stats s16, s32;
        EXPECT_OK(pfc_train_step(h16, b16, SHARDS, &s16));
        EXPECT_OK(pfc_train_step(h32, b32, SHARDS, &s32));
        CHECK(s16.step == s32.step && s16.global_batch == N && s16.sampled_classes == C);
        /* The same inputs (f16 values widened exactly): the same loss. */
        CHECK(fabs(s16.loss - s32.loss) <= 1e-6 * fabs(s32.loss));
        double err = 0.0, norm = 0.0;
        for (int k = 0; k < N * D; k++) {
            float g = f16_to_f32(grad16[k]);
            CHECK(isfinite(g));
            err += ((double)g - grad32[k]) * ((double)g - grad32[k]);
            norm += (double)grad32[k] * grad32[k];
        }
        CHECK(norm > 0.0);
        CHECK(sqrt(err / norm) < 2e-3); /* f16 rounding of the gradient */
    }

    /* f16 NaN and Inf are rejected with the head unchanged. */
    static float before[C * D], after[C * D];
    get_all_centers(h16, before);
    uint16_t saved = emb16[5];
    emb16[5] = 0x7e00u; /* NaN */
    EXPECT_ERROR(pfc_train_step(h16, b16, SHARDS, NULL), PFC_ERR_INVALID_ARGUMENT, "NaN");
    emb16[5] = 0xfc00u; /* -Inf */
    EXPECT_ERROR(pfc_train_step(h16, b16, SHARDS, NULL), PFC_ERR_INVALID_ARGUMENT, "NaN");
    emb16[5] = saved;
    /* An unknown dtype. */
    b16[1].dtype = 9;
    EXPECT_ERROR(pfc_train_step(h16, b16, SHARDS, NULL), PFC_ERR_INVALID_ARGUMENT, "dtype");
    b16[1].dtype = PFC_DTYPE_F16;
    /* memory = DEVICE on the CPU backend. */
    b16[0].memory = PFC_MEMORY_DEVICE;
    EXPECT_STATUS(pfc_train_step(h16, b16, SHARDS, NULL), PFC_ERR_INVALID_ARGUMENT);
    b16[0].memory = PFC_MEMORY_HOST;
    get_all_centers(h16, after);
    CHECK(memcmp(before, after, sizeof before) == 0);

    pfc_destroy(h16);
    pfc_destroy(h32);
}

/* ---------------------------------------------------------------------------------------------- */
/* Checkpoints, export and search. Files go to a fresh directory under /tmp, removed at the end.    */

static char scratch[64];

static const char *scratch_path(char *buf, size_t cap, const char *name) {
    int n = snprintf(buf, cap, "%s/%s", scratch, name);
    CHECK(n > 0 && (size_t)n < cap);
    return buf;
}

/* Removes every file of directory `dir`, then the directory (one level deep is all the tests make). */
static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (d == NULL) {
        return;
    }
    struct dirent *e;
    char path[512];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0) {
            remove_tree(path);
        }
    }
    closedir(d);
    rmdir(dir);
}

static long count_files(const char *dir) {
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

/* Reads a whole file into a malloc'd buffer; `*len` gets its size. */
static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL);
    CHECK(fseek(f, 0, SEEK_END) == 0);
    long n = ftell(f);
    CHECK(n >= 0);
    CHECK(fseek(f, 0, SEEK_SET) == 0);
    unsigned char *buf = (unsigned char *)malloc((size_t)n + 1);
    CHECK(buf != NULL);
    CHECK(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void train_steps(pfc_head *h, int steps, pfc_step_stats *last) {
    static float grad[N * D];
    pfc_batch b[SHARDS];
    make_batches(b, emb, grad, PFC_DTYPE_F32, sizeof(float));
    for (int t = 0; t < steps; t++) {
        EXPECT_OK(pfc_train_step(h, b, SHARDS, last));
    }
}

static void test_checkpoint(void) {
    char dir[128], manifest[160];
    scratch_path(dir, sizeof dir, "ckpt");
    scratch_path(manifest, sizeof manifest, "ckpt/manifest.json");

    pfc_config cfg;
    base_config(&cfg);
    cfg.optimizer = PFC_OPTIMIZER_ADAMW;
    cfg.lr = 0.01f;
    cfg.sample_rate = 0.5f;
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    pfc_step_stats st;
    train_steps(h, 2, &st);
    CHECK(st.step == 2);
    EXPECT_OK(pfc_save_checkpoint(h, dir));
    CHECK(count_files(dir) == 1 + SHARDS); /* the manifest and one file per shard */

    /* The same layout, another seed and learning rate: after loading, training continues exactly. */
    pfc_config other = cfg;
    other.seed = 99;
    other.lr = 0.5f;
    pfc_head *same = NULL;
    EXPECT_OK(pfc_create(&other, &same));
    static float a[C * D], b[C * D];
    get_all_centers(h, a);
    get_all_centers(same, b);
    CHECK(memcmp(a, b, sizeof a) != 0);
    EXPECT_OK(pfc_load_checkpoint(same, dir));
    get_all_centers(same, b);
    CHECK(memcmp(a, b, sizeof a) == 0);
    pfc_step_stats s1, s2;
    train_steps(h, 2, &s1);
    train_steps(same, 2, &s2);
    CHECK(s1.step == 4 && s2.step == 4);
    CHECK(s1.loss == s2.loss && s1.sampled_classes == s2.sampled_classes);
    get_all_centers(h, a);
    get_all_centers(same, b);
    CHECK(memcmp(a, b, sizeof a) == 0);

    /* Another shard count loads the same centers. */
    EXPECT_OK(pfc_save_checkpoint(h, dir)); /* replaces the previous checkpoint */
    CHECK(count_files(dir) == 1 + SHARDS);
    pfc_config three = cfg;
    three.local_shards = 3;
    pfc_head *h3 = NULL;
    EXPECT_OK(pfc_create(&three, &h3));
    EXPECT_OK(pfc_load_checkpoint(h3, dir));
    uint64_t first = 0, count = 0;
    EXPECT_OK(pfc_local_classes(h3, &first, &count));
    CHECK(first == 0 && count == C);
    EXPECT_OK(pfc_get_centers(h3, 0, C, 0, b));
    CHECK(memcmp(a, b, sizeof a) == 0);

    /* Errors leave the head as it was. */
    char missing[128];
    scratch_path(missing, sizeof missing, "no-such-checkpoint");
    EXPECT_ERROR(pfc_load_checkpoint(h3, missing), PFC_ERR_IO, "no-such-checkpoint");
    EXPECT_ERROR(pfc_load_checkpoint(h3, NULL), PFC_ERR_NULL_ARGUMENT, "dir");
    EXPECT_STATUS(pfc_save_checkpoint(NULL, dir), PFC_ERR_NULL_ARGUMENT);
    pfc_config wider = cfg;
    wider.num_classes = C + 1;
    pfc_head *hw = NULL;
    EXPECT_OK(pfc_create(&wider, &hw));
    EXPECT_ERROR(pfc_load_checkpoint(hw, dir), PFC_ERR_INCOMPATIBLE, "classes");
    pfc_destroy(hw);
    pfc_config sgd = cfg;
    sgd.optimizer = PFC_OPTIMIZER_SGD;
    pfc_head *hs = NULL;
    EXPECT_OK(pfc_create(&sgd, &hs));
    EXPECT_ERROR(pfc_load_checkpoint(hs, dir), PFC_ERR_INCOMPATIBLE, "optimizer");
    pfc_destroy(hs);
    /* One byte appended to the manifest: corrupt, and nothing changes. */
    train_steps(same, 1, NULL);
    get_all_centers(same, a);
    FILE *f = fopen(manifest, "ab");
    CHECK(f != NULL);
    CHECK(fputc(' ', f) == ' ');
    fclose(f);
    EXPECT_ERROR(pfc_load_checkpoint(same, dir), PFC_ERR_CORRUPT, "manifest");
    get_all_centers(same, b);
    CHECK(memcmp(a, b, sizeof a) == 0);

    pfc_destroy(h3);
    pfc_destroy(same);
    pfc_destroy(h);
}

static void test_export(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    static float w[C * D], unit[C * D];
    get_all_centers(h, w);
    EXPECT_OK(pfc_get_centers(h, 0, C, 1, unit));
    char path[128];
    size_t len = 0;

    /* .npy f32: the NPY 1.0 header, then the rows as little-endian floats (this host's order). */
    EXPECT_OK(pfc_export_centers(h, scratch_path(path, sizeof path, "c.npy"), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0));
    unsigned char *npy = read_file(path, &len);
    CHECK(memcmp(npy, "\x93NUMPY\x01\x00", 8) == 0);
    size_t header = 10u + (size_t)npy[8] + 256u * npy[9];
    CHECK(header % 64 == 0);
    CHECK(len == header + sizeof w);
    npy[header - 1] = 0;
    CHECK(strstr((const char *)npy + 10, "'descr': '<f4'") != NULL);
    CHECK(strstr((const char *)npy + 10, "'shape': (12, 16)") != NULL);
    CHECK(memcmp(npy + header, w, sizeof w) == 0);
    free(npy);

    /* .fvecs: each row as int32 dimension + floats; normalized here. */
    EXPECT_OK(pfc_export_centers(h, scratch_path(path, sizeof path, "c.fvecs"), PFC_FORMAT_FVECS, PFC_DTYPE_F32, 1));
    unsigned char *fv = read_file(path, &len);
    CHECK(len == C * (4 + D * sizeof(float)));
    for (int c = 0; c < C; c++) {
        int32_t dim;
        memcpy(&dim, fv + c * (4 + D * sizeof(float)), 4);
        CHECK(dim == D);
        CHECK(memcmp(fv + c * (4 + D * sizeof(float)) + 4, unit + c * D, D * sizeof(float)) == 0);
    }
    free(fv);

    /* safetensors f16: an 8-byte header length, a JSON header naming `centers`, then binary16 rows. */
    EXPECT_OK(pfc_export_centers(h, scratch_path(path, sizeof path, "c.safetensors"), PFC_FORMAT_SAFETENSORS, PFC_DTYPE_F16, 1));
    unsigned char *st = read_file(path, &len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | st[i];
    CHECK(len == 8 + n + C * D * 2);
    char *json = (char *)malloc((size_t)n + 1);
    CHECK(json != NULL);
    memcpy(json, st + 8, (size_t)n);
    json[n] = 0;
    CHECK(strstr(json, "\"centers\"") != NULL && strstr(json, "\"F16\"") != NULL && strstr(json, "[12,16]") != NULL);
    free(json);
    for (int k = 0; k < C * D; k++) {
        uint16_t v = (uint16_t)(st[8 + n + 2 * k] | (st[8 + n + 2 * k + 1] << 8));
        CHECK(v == f32_to_f16(unit[k]));
    }
    free(st);

    /* FAISS IndexFlatIP: fourcc, header, the rows; the search-only index opens it and answers as
       pfc_search does. */
    EXPECT_OK(pfc_export_centers(h, scratch_path(path, sizeof path, "c.faiss"), PFC_FORMAT_FAISS, PFC_DTYPE_F32, 0));
    unsigned char *fx = read_file(path, &len);
    CHECK(memcmp(fx, "IxFI", 4) == 0);
    CHECK(len == 45 + sizeof w);
    CHECK(memcmp(fx + 45, w, sizeof w) == 0);
    free(fx);
    pfc_index *ix = NULL;
    EXPECT_OK(pfc_index_open(path, &ix));
    uint64_t classes = 0;
    uint32_t dim = 0;
    EXPECT_OK(pfc_index_info(ix, &classes, &dim));
    CHECK(classes == C && dim == D);
    int64_t ids_head[3 * 4], ids_index[3 * 4];
    float scores_head[3 * 4], scores_index[3 * 4];
    EXPECT_OK(pfc_search(h, w, 3, 4, ids_head, scores_head));
    EXPECT_OK(pfc_index_search(ix, w, 3, 4, ids_index, scores_index));
    CHECK(memcmp(ids_head, ids_index, sizeof ids_head) == 0);
    CHECK(memcmp(scores_head, scores_index, sizeof scores_head) == 0);
    EXPECT_ERROR(pfc_index_search(ix, w, 1, C + 1, ids_index, scores_index), PFC_ERR_INVALID_ARGUMENT, "k");
    pfc_index_close(ix);
    pfc_index_close(NULL);
    ix = NULL;
    EXPECT_ERROR(pfc_index_open(scratch_path(path, sizeof path, "missing.npy"), &ix), PFC_ERR_IO, "missing");
    CHECK(ix == NULL);

    EXPECT_ERROR(pfc_export_centers(h, scratch_path(path, sizeof path, "x.fvecs"), PFC_FORMAT_FVECS, PFC_DTYPE_F16, 0), PFC_ERR_INVALID_ARGUMENT, "f32");
    EXPECT_ERROR(pfc_export_centers(h, path, 4, PFC_DTYPE_F32, 0), PFC_ERR_INVALID_ARGUMENT, "format");
    EXPECT_ERROR(pfc_export_centers(h, path, PFC_FORMAT_NPY, PFC_DTYPE_BF16, 0), PFC_ERR_INVALID_ARGUMENT, "f16");
    EXPECT_ERROR(pfc_export_centers(h, NULL, PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_NULL_ARGUMENT, "path");
    pfc_destroy(h);
}

static double cosine(const float *a, const float *b) {
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int j = 0; j < D; j++) {
        ab += (double)a[j] * b[j];
        aa += (double)a[j] * a[j];
        bb += (double)b[j] * b[j];
    }
    return ab / sqrt(aa) / sqrt(bb);
}

static void test_search(void) {
    pfc_config cfg;
    base_config(&cfg);
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    /* The prototypes as centers, class 11 a copy of class 3 at twice the length: they tie exactly. */
    static float centers[C * D];
    memcpy(centers, prototypes, sizeof centers);
    for (int j = 0; j < D; j++) centers[11 * D + j] = 2.0f * centers[3 * D + j];
    EXPECT_OK(pfc_set_centers(h, 0, C, centers));

    enum { Q = 4, K = 3 };
    static float queries[Q * D];
    const int from[Q] = {3, 0, 7, 11};
    for (int q = 0; q < Q; q++) {
        for (int j = 0; j < D; j++) queries[q * D + j] = 5.0f * centers[from[q] * D + j] + 0.01f * uniform();
    }
    int64_t ids[Q * K];
    float scores[Q * K];
    EXPECT_OK(pfc_search(h, queries, Q, K, ids, scores));
    for (int q = 0; q < Q; q++) {
        /* Brute force: the best class by cosine, ids ascending among equals. */
        double best = -2.0;
        int best_id = -1;
        for (int c = 0; c < C; c++) {
            double s = cosine(queries + q * D, centers + c * D);
            if (s > best + 1e-9) {
                best = s;
                best_id = c;
            }
        }
        CHECK(ids[q * K] == best_id);
        CHECK(fabs(scores[q * K] - best) < 1e-5);
        for (int r = 1; r < K; r++) {
            CHECK(scores[q * K + r] <= scores[q * K + r - 1]);
            CHECK(fabs(scores[q * K + r] - cosine(queries + q * D, centers + ids[q * K + r] * D)) < 1e-5);
        }
    }
    /* Queries near class 3 or 11: both first, tied, ids ascending. */
    CHECK(ids[0] == 3 && ids[1] == 11 && scores[0] == scores[1]);
    CHECK(ids[3 * K] == 3 && ids[3 * K + 1] == 11 && scores[3 * K] == scores[3 * K + 1]);

    /* k = C: every class once. */
    static int64_t all_ids[C];
    static float all_scores[C];
    EXPECT_OK(pfc_search(h, queries + 2 * D, 1, C, all_ids, all_scores));
    int seen[C] = {0};
    for (int c = 0; c < C; c++) {
        CHECK(all_ids[c] >= 0 && all_ids[c] < C);
        seen[all_ids[c]]++;
    }
    for (int c = 0; c < C; c++) CHECK(seen[c] == 1);

    /* Bad arguments: nothing written. */
    memset(ids, 0x5a, sizeof ids);
    EXPECT_ERROR(pfc_search(h, queries, Q, 0, ids, scores), PFC_ERR_INVALID_ARGUMENT, "k");
    EXPECT_ERROR(pfc_search(h, queries, 1, C + 1, ids, scores), PFC_ERR_INVALID_ARGUMENT, "k");
    EXPECT_ERROR(pfc_search(h, queries, 0, 1, ids, scores), PFC_ERR_INVALID_ARGUMENT, "n");
    float saved = queries[D + 2];
    queries[D + 2] = NAN;
    EXPECT_ERROR(pfc_search(h, queries, Q, K, ids, scores), PFC_ERR_INVALID_ARGUMENT, "NaN");
    queries[D + 2] = saved;
    EXPECT_ERROR(pfc_search(h, NULL, 1, 1, ids, scores), PFC_ERR_NULL_ARGUMENT, "queries");
    EXPECT_ERROR(pfc_search(h, queries, 1, 1, NULL, scores), PFC_ERR_NULL_ARGUMENT, "ids");
    EXPECT_ERROR(pfc_search(h, queries, 1, 1, ids, NULL), PFC_ERR_NULL_ARGUMENT, "scores");
    CHECK(bytes_all(ids, sizeof ids, 0x5a));
    pfc_destroy(h);
}

int main(void) {
    make_problem();
    test_version_and_config();
    test_half_conversion();
    test_last_error();
    test_create_errors();
    test_training();
    test_step_split();
    test_centers();
    test_margin_state();
    test_f16();
    strcpy(scratch, "/tmp/pfc_abi_test_XXXXXX");
    CHECK(mkdtemp(scratch) != NULL);
    test_checkpoint();
    test_export();
    test_search();
    remove_tree(scratch);
#ifdef __cplusplus
    printf("c abi (C++%ld): %u checks passed\n", (long)(__cplusplus / 100 % 100), checks_passed);
#else
    printf("c abi (C%ld): %u checks passed\n", (long)(__STDC_VERSION__ / 100 % 100), checks_passed);
#endif
    return 0;
}
