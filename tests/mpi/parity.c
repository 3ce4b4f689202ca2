/* One job over MPI processes (SPEC §2a), checked against the same job in one process.
 *
 * Run under mpirun by tests/all/mpi.rs with a case directory written by that test:
 *   parity CASE_DIR [--bad-label STEP PROC] [--nan-row STEP PROC] [--fail-callback CALL]
 *                   [--mismatch FIELD] [--expect-oom]
 * Every process drives its shards of a multi-process head (MPI_Allgather as the callback) and,
 * beside it, a one-process head with the job's total shard count fed the whole global batch. After
 * every step the loss and statistics, this process's returned gradients and its centers must match
 * that head (layout invariance, relative error <= 1e-6), and the case's expected values when it has
 * them (the reference's golden vectors). With `backend 1` in the case the multi-process head runs on
 * CUDA, process p's shards on the GPUs of their global ranks, against the one-process CPU head
 * within the case's `tol` (loss, centers) and `grad_tol` (gradients). The last line is
 * "rank R: N checks passed".
 */
#include "partialfc.h"

#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank_, size_;
static long checks_;

#define FAIL(...)                                                                 \
    do {                                                                          \
        fprintf(stderr, "rank %d: ", rank_);                                      \
        fprintf(stderr, __VA_ARGS__);                                             \
        fprintf(stderr, "\n");                                                    \
        MPI_Abort(MPI_COMM_WORLD, 3);                                             \
    } while (0)

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        checks_++;                                                                \
        if (!(cond)) FAIL(__VA_ARGS__);                                           \
    } while (0)

static const char *last_error(void) {
    static char buf[1024];
    pfc_last_error(buf, sizeof buf);
    return buf;
}

/* ---- the host's process group ---------------------------------------------------------------- */

typedef struct {
    MPI_Comm comm;
    long calls;
    long fail_at; /* -1: never */
} group_ctx;

static int32_t mpi_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    group_ctx *g = (group_ctx *)ctx;
    long call = g->calls++;
    if (call == g->fail_at) return 7; /* every process fails the same call, as MPI errors do */
    if (bytes > (size_t)INT32_MAX) return 2;
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, g->comm) == MPI_SUCCESS ? 0 : 1;
}

/* ---- the case -------------------------------------------------------------------------------- */

typedef struct {
    uint64_t classes;
    uint32_t dim, steps;
    float sample_rate, scale, m1, m2, m3, filter, lr, momentum, weight_decay;
    int margin_kind;
    float margin_m, adaface_h, adaface_t_alpha;
    int storage_dtype;
    int optimizer;
    uint64_t seed;
    int expect;
    double expect_tol;
    int backend;   /* of the multi-process head; the one-process head is always the CPU's */
    double tol, grad_tol; /* loss and centers, and gradients, against the one-process head */
    int shards[64]; /* per process */
    int nprocs;
} case_t;

static char dir_[4096];

static void *read_file(const char *name, size_t want) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", dir_, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    void *buf = malloc(want ? want : 1);
    size_t got = fread(buf, 1, want, f);
    fclose(f);
    if (got != want) FAIL("%s: read %zu of %zu bytes", path, got, want);
    return buf;
}

static void read_case(case_t *c) {
    char path[8192];
    snprintf(path, sizeof path, "%s/config.txt", dir_);
    FILE *f = fopen(path, "r");
    if (!f) FAIL("cannot open %s", path);
    memset(c, 0, sizeof *c);
    c->tol = c->grad_tol = 1e-6;
    pfc_config defaults;
    pfc_config_init(&defaults);
    c->adaface_h = defaults.adaface_h;
    c->adaface_t_alpha = defaults.adaface_t_alpha;
    char key[64], val[512];
    while (fscanf(f, "%63s %511s", key, val) == 2) {
        if (!strcmp(key, "num_classes")) c->classes = strtoull(val, NULL, 10);
        else if (!strcmp(key, "embedding_dim")) c->dim = (uint32_t)atoi(val);
        else if (!strcmp(key, "steps")) c->steps = (uint32_t)atoi(val);
        else if (!strcmp(key, "sample_rate")) c->sample_rate = strtof(val, NULL);
        else if (!strcmp(key, "scale")) c->scale = strtof(val, NULL);
        else if (!strcmp(key, "m1")) c->m1 = strtof(val, NULL);
        else if (!strcmp(key, "m2")) c->m2 = strtof(val, NULL);
        else if (!strcmp(key, "m3")) c->m3 = strtof(val, NULL);
        else if (!strcmp(key, "interclass_filter")) c->filter = strtof(val, NULL);
        else if (!strcmp(key, "margin_kind")) c->margin_kind = atoi(val);
        else if (!strcmp(key, "margin_m")) c->margin_m = strtof(val, NULL);
        else if (!strcmp(key, "adaface_h")) c->adaface_h = strtof(val, NULL);
        else if (!strcmp(key, "adaface_t_alpha")) c->adaface_t_alpha = strtof(val, NULL);
        else if (!strcmp(key, "storage_dtype")) c->storage_dtype = atoi(val);
        else if (!strcmp(key, "lr")) c->lr = strtof(val, NULL);
        else if (!strcmp(key, "momentum")) c->momentum = strtof(val, NULL);
        else if (!strcmp(key, "weight_decay")) c->weight_decay = strtof(val, NULL);
        else if (!strcmp(key, "optimizer")) c->optimizer = atoi(val);
        else if (!strcmp(key, "seed")) c->seed = strtoull(val, NULL, 10);
        else if (!strcmp(key, "expect")) c->expect = atoi(val);
        else if (!strcmp(key, "expect_tol")) c->expect_tol = strtod(val, NULL);
        else if (!strcmp(key, "backend")) c->backend = atoi(val);
        else if (!strcmp(key, "tol")) c->tol = strtod(val, NULL);
        else if (!strcmp(key, "grad_tol")) c->grad_tol = strtod(val, NULL);
        else if (!strcmp(key, "shards")) {
            char *s = val;
            while (*s && c->nprocs < 64) {
                c->shards[c->nprocs++] = (int)strtol(s, &s, 10);
                if (*s == ',') s++;
            }
        } else FAIL("config.txt: unknown key %s", key);
    }
    fclose(f);
}

static void base_config(const case_t *c, pfc_config *cfg) {
    pfc_config_init(cfg);
    cfg->num_classes = c->classes;
    cfg->embedding_dim = c->dim;
    cfg->sample_rate = c->sample_rate;
    cfg->scale = c->scale;
    cfg->m1 = c->m1;
    cfg->m2 = c->m2;
    cfg->m3 = c->m3;
    cfg->interclass_filter = c->filter;
    cfg->margin_kind = c->margin_kind;
    cfg->margin_m = c->margin_m;
    cfg->adaface_h = c->adaface_h;
    cfg->adaface_t_alpha = c->adaface_t_alpha;
    cfg->storage_dtype = c->storage_dtype;
    cfg->optimizer = c->optimizer;
    cfg->lr = c->lr;
    cfg->momentum = c->momentum;
    cfg->weight_decay = c->weight_decay;
    cfg->seed = c->seed;
}

/* ‖a − b‖ / ‖b‖ (L2), as tests/all/common.rs's rel_err */
static double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (num != num) return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Every process holds the same string (status and message agree everywhere). */
static void check_same_everywhere(const char *what, int status, const char *msg) {
    char mine[512] = {0};
    snprintf(mine, sizeof mine, "%d %s", status, msg);
    char *all = malloc(512 * (size_t)size_);
    MPI_Allgather(mine, 512, MPI_CHAR, all, 512, MPI_CHAR, MPI_COMM_WORLD);
    for (int p = 0; p < size_; p++)
        CHECK(!strcmp(all + 512 * p, mine), "%s: process %d reported \"%s\", this one \"%s\"", what, p, all + 512 * p, mine);
    free(all);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    if (argc < 2) FAIL("usage: parity CASE_DIR [options]");
    snprintf(dir_, sizeof dir_, "%s", argv[1]);
    long bad_label_step = -1, bad_label_proc = -1, nan_step = -1, nan_proc = -1, fail_call = -1;
    int unprovable = 0;
    const char *mismatch = NULL;
    /* Some process runs out of (device) memory within a step: it must fail on every process alike. */
    int expect_oom = 0;
    int bitwise = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--bad-label") && i + 2 < argc) {
            bad_label_step = atol(argv[++i]);
            bad_label_proc = atol(argv[++i]);
        } else if (!strcmp(argv[i], "--nan-row") && i + 2 < argc) {
            nan_step = atol(argv[++i]);
            nan_proc = atol(argv[++i]);
        } else if (!strcmp(argv[i], "--fail-callback") && i + 1 < argc) {
            fail_call = atol(argv[++i]);
        } else if (!strcmp(argv[i], "--unprovable")) {
            unprovable = 1; /* class 0 (process 0's) gets a center no bound proves safe to update */
        } else if (!strcmp(argv[i], "--bitwise")) {
            bitwise = 1; /* every reduction runs in rank order: the layout changes no bit */
        } else if (!strcmp(argv[i], "--expect-oom")) {
            expect_oom = 1;
        } else if (!strcmp(argv[i], "--mismatch") && i + 1 < argc) {
            mismatch = argv[++i];
        } else FAIL("unknown option %s", argv[i]);
    }

    case_t c;
    read_case(&c);
    if (c.nprocs != size_) FAIL("the case lists shards for %d processes, mpirun started %d", c.nprocs, size_);
    int total = 0, first = 0;
    for (int p = 0; p < size_; p++) {
        if (p < rank_) first += c.shards[p];
        total += c.shards[p];
    }
    int mine = c.shards[rank_];
    size_t d = c.dim;

    group_ctx gctx = {MPI_COMM_WORLD, 0, fail_call};
    pfc_config cfg;
    base_config(&c, &cfg);
    cfg.local_shards = (uint32_t)mine;
    cfg.process_count = (uint32_t)size_;
    cfg.process_index = (uint32_t)rank_;
    cfg.allgather = mpi_allgather;
    cfg.allgather_ctx = &gctx;
    cfg.backend = c.backend;
    int32_t devices[64];
    if (c.backend == PFC_BACKEND_CUDA) {
        /* One GPU per global rank: processes on one machine never share a GPU (NCCL refuses it). */
        for (int s = 0; s < mine; s++) devices[s] = first + s;
        cfg.devices = devices;
    }

    if (mismatch) {
        /* One process passes another value: every process fails, naming the field. */
        if (rank_ == size_ - 1) {
            if (!strcmp(mismatch, "lr")) cfg.lr *= 2;
            else if (!strcmp(mismatch, "num_classes")) cfg.num_classes += 1;
            else if (!strcmp(mismatch, "world_size")) cfg.world_size = 99;
            else if (!strcmp(mismatch, "embedding_dim")) cfg.embedding_dim = 0; /* invalid on one process only */
            else if (!strcmp(mismatch, "margin_kind")) cfg.margin_kind = PFC_MARGIN_ADAFACE; /* valid alone */
            else if (!strcmp(mismatch, "storage_dtype")) cfg.storage_dtype = PFC_DTYPE_BF16; /* valid alone */
        }
        pfc_head *h = NULL;
        int st = pfc_create(&cfg, &h);
        CHECK(st == PFC_ERR_INVALID_ARGUMENT, "mismatched %s: pfc_create returned %d (%s)", mismatch, st, last_error());
        CHECK(h == NULL, "a failed create wrote its output");
        CHECK(strstr(last_error(), mismatch) != NULL, "the message does not name %s: %s", mismatch, last_error());
        check_same_everywhere("mismatched create", st, last_error());
        printf("rank %d: %ld checks passed\n", rank_, checks_);
        MPI_Finalize();
        return 0;
    }

    pfc_head *multi = NULL, *solo = NULL;
    int st = pfc_create(&cfg, &multi);
    if (st != PFC_OK) FAIL("multi-process pfc_create: %d %s", st, last_error());
    pfc_config scfg;
    base_config(&c, &scfg);
    scfg.local_shards = (uint32_t)total;
    st = pfc_create(&scfg, &solo);
    if (st != PFC_OK) FAIL("one-process pfc_create: %d %s", st, last_error());

    uint64_t lo, count, slo, scount;
    pfc_local_classes(multi, &lo, &count);
    pfc_local_classes(solo, &slo, &scount);
    CHECK(slo == 0 && scount == c.classes, "the one-process head owns [%llu, +%llu)", (unsigned long long)slo, (unsigned long long)scount);
    {
        /* This process's classes are those of global ranks [first, first + mine) (SPEC §1.1). */
        uint64_t base = c.classes / (uint64_t)total, rem = c.classes % (uint64_t)total;
        uint64_t want_lo = base * (uint64_t)first + ((uint64_t)first < rem ? (uint64_t)first : rem);
        uint64_t end_rank = (uint64_t)(first + mine);
        uint64_t want_hi = base * end_rank + (end_rank < rem ? end_rank : rem);
        CHECK(lo == want_lo && lo + count == want_hi, "local classes [%llu, %llu), want [%llu, %llu)", (unsigned long long)lo,
              (unsigned long long)(lo + count), (unsigned long long)want_lo, (unsigned long long)want_hi);
    }

    size_t cd = (size_t)c.classes * d;
    float *init = read_file("weight_init.bin", cd * sizeof(float));
    if (init) {
        CHECK(pfc_set_centers(multi, lo, count, init + lo * d) == PFC_OK, "set_centers: %s", last_error());
        CHECK(pfc_set_centers(solo, 0, c.classes, init) == PFC_OK, "set_centers: %s", last_error());
    }
    if (unprovable) {
        /* Norm 1.5 * 2^61: the update keeps it below the 2^62 limit (the exact check passes), but
         * above the half of the limit the update's proof needs. Only process 0's shard holds it,
         * so the job must agree to take the checked path everywhere. */
        float *row = calloc(d, sizeof(float));
        row[0] = 1.5f * 2305843009213693952.0f;
        if (lo == 0) CHECK(pfc_set_centers(multi, 0, 1, row) == PFC_OK, "set_centers: %s", last_error());
        CHECK(pfc_set_centers(solo, 0, 1, row) == PFC_OK, "set_centers: %s", last_error());
        free(row);
    }
    float *mc = malloc(count * d * sizeof(float)), *sc = malloc(cd * sizeof(float));

    for (uint32_t t = 0; t < c.steps; t++) {
        char name[256];
        snprintf(name, sizeof name, "rows.%u.txt", t);
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir_, name);
        FILE *rf = fopen(path, "r");
        if (!rf) FAIL("cannot open %s", path);
        uint64_t rows[64], n = 0;
        for (int s = 0; s < total; s++) {
            unsigned long long v;
            if (fscanf(rf, "%llu", &v) != 1) FAIL("%s: fewer than %d counts", path, total);
            rows[s] = v;
            n += v;
        }
        fclose(rf);
        snprintf(name, sizeof name, "emb.%u.bin", t);
        float *emb = read_file(name, n * d * sizeof(float));
        snprintf(name, sizeof name, "labels.%u.bin", t);
        int64_t *labels = read_file(name, n * sizeof(int64_t));
        if (!emb || !labels) FAIL("step %u: missing inputs", t);
        float *grad_m = calloc(n * d, sizeof(float)), *grad_s = calloc(n * d, sizeof(float));

        pfc_batch sb[64], mb[64];
        uint64_t off = 0, my_off = 0, my_rows = 0;
        for (int s = 0; s < total; s++) {
            sb[s] = (pfc_batch){.embeddings = emb + off * d, .labels = labels + off, .grad_embeddings = grad_s + off * d,
                                .batch_size = rows[s], .dtype = PFC_DTYPE_F32, .memory = PFC_MEMORY_HOST};
            if (s == first) my_off = off;
            if (s >= first && s < first + mine) {
                mb[s - first] = (pfc_batch){.embeddings = emb + off * d, .labels = labels + off, .grad_embeddings = grad_m + off * d,
                                            .batch_size = rows[s], .dtype = PFC_DTYPE_F32, .memory = PFC_MEMORY_HOST};
                my_rows += rows[s];
            }
            off += rows[s];
        }

        /* A bad input on one process only: every process fails alike, nothing changes anywhere. */
        int bad = 0;
        float *bad_emb = NULL;
        int64_t *bad_labels = NULL;
        if ((long)t == bad_label_step || (long)t == nan_step) {
            bad = 1;
            long proc = (long)t == bad_label_step ? bad_label_proc : nan_proc;
            if (rank_ == proc && my_rows > 0) {
                bad_emb = malloc(my_rows * d * sizeof(float));
                bad_labels = malloc(my_rows * sizeof(int64_t));
                memcpy(bad_emb, emb + my_off * d, my_rows * d * sizeof(float));
                memcpy(bad_labels, labels + my_off, my_rows * sizeof(int64_t));
                if ((long)t == bad_label_step) bad_labels[my_rows - 1] = (int64_t)c.classes;
                else bad_emb[(my_rows - 1) * d] = NAN;
                uint64_t o = 0;
                for (int s = 0; s < mine; s++) {
                    mb[s].embeddings = bad_emb + o * d;
                    mb[s].labels = bad_labels + o;
                    o += mb[s].batch_size;
                }
            }
            pfc_get_centers(multi, lo, count, 0, mc);
            for (size_t i = 0; i < my_rows * d; i++) grad_m[my_off * d + i] = 12345.0f;
            pfc_step_stats junk = {-1, -1, 99, 99, 99};
            int bst = pfc_train_step(multi, mb, (uint32_t)mine, &junk);
            CHECK(bst == PFC_ERR_INVALID_ARGUMENT, "step %u with bad input on process %ld returned %d (%s)", t, proc, bst, last_error());
            char where[64];
            snprintf(where, sizeof where, "process %ld:", proc);
            CHECK(strstr(last_error(), where) != NULL, "the message does not name the process: %s", last_error());
            check_same_everywhere("bad input", bst, last_error());
            CHECK(junk.step == 99 && junk.loss == -1, "a failed step wrote its stats");
            for (size_t i = 0; i < my_rows * d; i++) CHECK(grad_m[my_off * d + i] == 12345.0f, "a failed step wrote gradients");
            float *after = malloc(count * d * sizeof(float));
            pfc_get_centers(multi, lo, count, 0, after);
            CHECK(!memcmp(after, mc, count * d * sizeof(float)), "a failed step changed centers");
            free(after);
            for (int s = 0; s < mine; s++) {
                uint64_t o = 0;
                for (int r = 0; r < first + s; r++) o += rows[r];
                mb[s].embeddings = emb + o * d;
                mb[s].labels = labels + o;
            }
            free(bad_emb);
            free(bad_labels);
        }

        pfc_step_stats ms, ss;
        st = pfc_train_step(multi, mb, (uint32_t)mine, &ms);
        if (fail_call >= 0 && st != PFC_OK) {
            /* A failing callback: PFC_ERR_COMMUNICATION everywhere, and the head stays refused. */
            CHECK(st == PFC_ERR_COMMUNICATION, "step %u after a failed callback returned %d (%s)", t, st, last_error());
            check_same_everywhere("failed callback", st, last_error());
            int again = pfc_train_step(multi, mb, (uint32_t)mine, &ms);
            CHECK(again == PFC_ERR_COMMUNICATION, "the poisoned head accepted a step: %d", again);
            CHECK(strstr(last_error(), "checkpoint") != NULL, "the refusal does not say how to recover: %s", last_error());
            again = pfc_evaluate(multi, mb, (uint32_t)mine, &ms);
            CHECK(again == PFC_ERR_COMMUNICATION, "the poisoned head accepted an evaluation: %d", again);
            again = pfc_set_learning_rate(multi, 0.01f);
            CHECK(again == PFC_ERR_COMMUNICATION, "the poisoned head accepted a learning rate: %d", again);
            printf("rank %d: %ld checks passed\n", rank_, checks_);
            pfc_destroy(multi);
            pfc_destroy(solo);
            MPI_Finalize();
            return 0;
        }
        if (expect_oom && st != PFC_OK) {
            CHECK(st == PFC_ERR_OUT_OF_MEMORY, "step %u on a process out of memory returned %d (%s)", t, st, last_error());
            check_same_everywhere("out of memory", st, last_error());
            printf("rank %d: out of memory at step %u: %s\n", rank_, t, last_error());
            printf("rank %d: %ld checks passed\n", rank_, checks_);
            pfc_destroy(multi);
            pfc_destroy(solo);
            MPI_Finalize();
            return 0;
        }
        if (st != PFC_OK) FAIL("step %u: multi-process step %d %s", t, st, last_error());
        st = pfc_train_step(solo, sb, (uint32_t)total, &ss);
        if (st != PFC_OK) FAIL("step %u: one-process step %d %s", t, st, last_error());
        (void)bad;

        double le = fabs(ms.loss - ss.loss) / fabs(ss.loss);
        CHECK(le <= c.tol, "step %u: loss %.9g vs one process %.9g (rel %.3g)", t, ms.loss, ss.loss, le);
        /* Another backend's rounding may flip a near-tie of cosines: one sample's worth. */
        CHECK(fabs(ms.accuracy - ss.accuracy) <= (c.tol > 1e-6 ? 1.0 / (double)n : 0.0), "step %u: accuracy %g vs %g", t, ms.accuracy, ss.accuracy);
        CHECK(ms.step == ss.step && ms.global_batch == ss.global_batch && ms.global_batch == n, "step %u: step/global batch differ", t);
        CHECK(ms.sampled_classes == ss.sampled_classes, "step %u: sampled classes %llu vs %llu", t,
              (unsigned long long)ms.sampled_classes, (unsigned long long)ss.sampled_classes);
        /* Each of this process's shards' gradients. */
        uint64_t o = my_off;
        for (int s = 0; s < mine; s++) {
            size_t len = mb[s].batch_size * d;
            double ge = rel_err(grad_m + o * d, grad_s + o * d, len);
            CHECK(ge <= c.grad_tol, "step %u shard %d: gradient rel err %.3g", t, first + s, ge);
            o += mb[s].batch_size;
        }
        pfc_get_centers(multi, lo, count, 0, mc);
        pfc_get_centers(solo, 0, c.classes, 0, sc);
        double we = rel_err(mc, sc + lo * d, count * d);
        CHECK(we <= c.tol, "step %u: centers rel err %.3g", t, we);
        /* The adaptive margins' running statistics: the same on every process as on one (on CUDA
           within `tol` of their scale, 1 for t, a mean of cosines, and tens for AdaFace's norms). */
        float state_m[8], state_s[8];
        uint32_t len_m = 0, len_s = 0;
        if (pfc_margin_state(multi, state_m, 8, &len_m) != PFC_OK || pfc_margin_state(solo, state_s, 8, &len_s) != PFC_OK)
            FAIL("step %u: pfc_margin_state: %s", t, last_error());
        int same_state = len_m == len_s;
        for (uint32_t k = 0; same_state && k < len_m; k++)
            same_state = c.backend ? fabs(state_m[k] - state_s[k]) <= c.tol * fmax(1.0, fabs(state_s[k])) : state_m[k] == state_s[k];
        CHECK(same_state, "step %u: running statistics differ from one process's", t);
        if (bitwise) {
            CHECK(ms.loss == ss.loss, "step %u: loss not bit-identical", t);
            CHECK(!memcmp(grad_m + my_off * d, grad_s + my_off * d, my_rows * d * sizeof(float)), "step %u: gradients not bit-identical", t);
            CHECK(!memcmp(mc, sc + lo * d, count * d * sizeof(float)), "step %u: centers not bit-identical", t);
        }

        if (c.expect) {
            snprintf(name, sizeof name, "loss.%u.bin", t);
            float *want_loss = read_file(name, sizeof(float));
            snprintf(name, sizeof name, "grad_emb.%u.bin", t);
            float *want_grad = read_file(name, n * d * sizeof(float));
            snprintf(name, sizeof name, "weight.%u.bin", t);
            float *want_w = read_file(name, cd * sizeof(float));
            double e = fabs(ms.loss - want_loss[0]) / fabs(want_loss[0]);
            CHECK(e <= c.expect_tol, "step %u: loss %.9g vs reference %.9g", t, ms.loss, want_loss[0]);
            e = rel_err(grad_m + my_off * d, want_grad + my_off * d, my_rows * d);
            CHECK(e <= c.expect_tol, "step %u: gradient vs reference rel err %.3g", t, e);
            e = rel_err(mc, want_w + lo * d, count * d);
            CHECK(e <= c.expect_tol, "step %u: centers vs reference rel err %.3g", t, e);
            if (len_m > 0) {
                snprintf(name, sizeof name, "state.%u.bin", t);
                float *want_state = read_file(name, len_m * sizeof(float));
                e = rel_err(state_m, want_state, len_m);
                CHECK(e <= c.expect_tol, "step %u: running statistics vs reference rel err %.3g", t, e);
                free(want_state);
            }
            free(want_loss);
            free(want_grad);
            free(want_w);
        }
        free(emb);
        free(labels);
        free(grad_m);
        free(grad_s);
    }
    CHECK(fail_call < 0, "the callback was to fail at call %ld but the run made only %ld calls", fail_call, gctx.calls);
    CHECK(!expect_oom, "no step ran out of memory");
    printf("rank %d: %ld checks passed\n", rank_, checks_);
    free(mc);
    free(sc);
    free(init);
    pfc_destroy(multi);
    pfc_destroy(solo);
    MPI_Finalize();
    return 0;
}
