/* Checkpoints, export and search of one job over MPI processes (SPEC §2a), driven by
 * tests/all/persist_mpi.rs:
 *
 *   persist DIR SHARDS MODE [ARGS]
 *
 * SHARDS lists every process's local shard count ("2,2"). Every process drives its shards of one
 * head (MPI_Allgather as the callback; with one process, a plain head) and feeds them its part of a
 * deterministic global batch per step (the same rows for the same global shard whatever the
 * layout). Modes:
 *   train T        train T steps, save DIR/ckpt, export DIR/export.*, search into DIR/search.bin
 *   resume T FROM TAG  load DIR/ckpt (saved at step FROM), save it again as DIR/ckpt-TAG, export
 *                  DIR/export-TAG.*, search into DIR/search-TAG.bin, then train steps FROM..FROM+T
 *                  and export DIR/after-TAG.npy
 *   save-loop      (200003 classes) train and save into DIR/ckpt forever, printing "saved STEP" after each save
 *                  (process 0), "saving RANK STEP" before each, and "pid RANK PID" first (the test
 *                  kills one process mid-save)
 *   save-once      (200003 classes) one step, one save into DIR/ckpt
 *   fail-save      save once, then again with the callback failing at its 1st, 2nd, … call of the
 *                  save: each must give PFC_ERR_COMMUNICATION everywhere and leave a loadable
 *                  checkpoint, the head refused until a load; prints "failure points N"; the same
 *                  for exports (the previous file stays as it was; "export failure points N"), and a
 *                  search with other queries on one process, refused everywhere alike
 * Every process checks that its search results equal process 0's. The last line of a finished run
 * is "rank R: done". With PFC_PERSIST_STORAGE=bf16 in the environment the head stores bf16
 * (storage_dtype), so its checkpoints hold BF16 tensors.
 */
#include "partialfc.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int rank_, size_;

#define FAIL(...)                                \
    do {                                         \
        fprintf(stderr, "rank %d: ", rank_);     \
        fprintf(stderr, __VA_ARGS__);            \
        fprintf(stderr, "\n");                   \
        MPI_Abort(MPI_COMM_WORLD, 3);            \
    } while (0)

static const char *last_error(void) {
    static char buf[1024];
    pfc_last_error(buf, sizeof buf);
    return buf;
}

#define OK(call)                                                               \
    do {                                                                       \
        int st_ = (call);                                                      \
        if (st_ != PFC_OK) FAIL("%s: status %d: %s", #call, st_, last_error()); \
    } while (0)

/* Calls of the callback so far, and the one that fails on every process (-1: none), as a failed
   MPI collective fails everywhere. */
static long calls_, fail_at_ = -1;

static int32_t mpi_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    (void)ctx;
    if (calls_++ == fail_at_) return 7;
    if (bytes > (size_t)INT32_MAX) return 2;
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : 1;
}

enum { DIM = 16, ROWS = 24, QUERIES = 5, K = 10 };

/* Classes of the job; save-loop uses many, so that a save takes long enough to be killed in. */
static uint64_t classes_ = 997;

static char dir_[4096];
static int shards_[64], nprocs_, first_, world_;

static const char *path(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", dir_, name);
    return buf;
}

/* SplitMix64: the batch of step t, identical in every process. */
static uint64_t mix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float uniform(uint64_t *s) {
    return (float)((double)(mix(s) >> 11) / 9007199254740992.0) * 2.0f - 1.0f;
}

static float emb_[ROWS * DIM], grad_[ROWS * DIM];
static int64_t labels_[ROWS];

static void step(pfc_head *h, uint64_t t) {
    uint64_t s = 0xC0FFEE ^ (t * 0x9E3779B9ull);
    for (int i = 0; i < ROWS; i++) {
        labels_[i] = (int64_t)(mix(&s) % classes_);
        for (int j = 0; j < DIM; j++) emb_[i * DIM + j] = uniform(&s);
    }
    /* Global shard g gets rows [g·ROWS/W, (g+1)·ROWS/W). */
    pfc_batch b[64];
    int mine = shards_[rank_];
    for (int i = 0; i < mine; i++) {
        int g = first_ + i;
        int lo = g * ROWS / world_, hi = (g + 1) * ROWS / world_;
        b[i].embeddings = emb_ + lo * DIM;
        b[i].labels = labels_ + lo;
        b[i].grad_embeddings = grad_ + lo * DIM;
        b[i].batch_size = (uint64_t)(hi - lo);
        b[i].dtype = PFC_DTYPE_F32;
        b[i].memory = PFC_MEMORY_HOST;
        b[i].stream = NULL;
    }
    pfc_step_stats st;
    OK(pfc_train_step(h, b, (uint32_t)mine, &st));
}

static pfc_head *create(void) {
    pfc_config cfg;
    pfc_config_init(&cfg);
    cfg.num_classes = classes_;
    cfg.embedding_dim = DIM;
    cfg.sample_rate = 0.5f;
    cfg.scale = 16.0f;
    cfg.m2 = 0.3f;
    cfg.optimizer = PFC_OPTIMIZER_ADAMW;
    cfg.lr = 0.01f;
    cfg.weight_decay = 0.01f;
    cfg.seed = 1234;
    cfg.init_std = 0.5f;
    cfg.local_shards = (uint32_t)shards_[rank_];
    const char *storage = getenv("PFC_PERSIST_STORAGE");
    if (storage && !strcmp(storage, "bf16")) cfg.storage_dtype = PFC_DTYPE_BF16;
    else if (storage && *storage) FAIL("PFC_PERSIST_STORAGE=%s: expected bf16 or nothing", storage);
    if (size_ > 1) {
        cfg.process_count = (uint32_t)size_;
        cfg.process_index = (uint32_t)rank_;
        cfg.allgather = mpi_allgather;
    }
    pfc_head *h = NULL;
    OK(pfc_create(&cfg, &h));
    return h;
}

static void export_all(pfc_head *h, const char *tag) {
    static const struct {
        int format, dtype, normalized;
        const char *ext;
    } kinds[] = {
        {PFC_FORMAT_SAFETENSORS, PFC_DTYPE_F32, 0, "safetensors"},
        {PFC_FORMAT_SAFETENSORS, PFC_DTYPE_BF16, 0, "bf16.safetensors"},
        {PFC_FORMAT_NPY, PFC_DTYPE_F16, 1, "npy"},
        {PFC_FORMAT_FVECS, PFC_DTYPE_F32, 1, "fvecs"},
        {PFC_FORMAT_FAISS, PFC_DTYPE_F32, 0, "faiss"},
    };
    char name[256], p[8192];
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        snprintf(name, sizeof name, "export%s.%s", tag, kinds[i].ext);
        OK(pfc_export_centers(h, path(p, sizeof p, name), kinds[i].format, kinds[i].dtype, kinds[i].normalized));
    }
}

/* Searches fixed queries; every process must get process 0's answer, which process 0 writes. */
static void search(pfc_head *h, const char *name) {
    float q[QUERIES * DIM];
    uint64_t s = 77;
    for (int i = 0; i < QUERIES * DIM; i++) q[i] = uniform(&s);
    int64_t ids[QUERIES * K], ids0[QUERIES * K];
    float scores[QUERIES * K], scores0[QUERIES * K];
    OK(pfc_search(h, q, QUERIES, K, ids, scores));
    memcpy(ids0, ids, sizeof ids);
    memcpy(scores0, scores, sizeof scores);
    MPI_Bcast(ids0, (int)sizeof ids0, MPI_BYTE, 0, MPI_COMM_WORLD);
    MPI_Bcast(scores0, (int)sizeof scores0, MPI_BYTE, 0, MPI_COMM_WORLD);
    if (memcmp(ids, ids0, sizeof ids) || memcmp(scores, scores0, sizeof scores)) FAIL("search results differ from process 0's");
    if (rank_ == 0) {
        char p[8192];
        FILE *f = fopen(path(p, sizeof p, name), "wb");
        if (!f || fwrite(ids, sizeof ids, 1, f) != 1 || fwrite(scores, sizeof scores, 1, f) != 1) FAIL("cannot write %s", p);
        fclose(f);
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    if (argc < 4) FAIL("usage: persist DIR SHARDS MODE [ARG]");
    snprintf(dir_, sizeof dir_, "%s", argv[1]);
    for (char *s = argv[2]; *s && nprocs_ < 64;) {
        shards_[nprocs_++] = (int)strtol(s, &s, 10);
        if (*s == ',') s++;
    }
    if (nprocs_ != size_) FAIL("SHARDS lists %d processes, mpirun started %d", nprocs_, size_);
    for (int p = 0; p < size_; p++) {
        if (p < rank_) first_ += shards_[p];
        world_ += shards_[p];
    }
    const char *mode = argv[3];
    char p[8192], name[256];
    if (!strcmp(mode, "save-loop") || !strcmp(mode, "save-once")) classes_ = 200003;
    pfc_head *h = create();
    if (!strcmp(mode, "train") && argc == 5) {
        int steps = atoi(argv[4]);
        for (int t = 0; t < steps; t++) step(h, (uint64_t)t);
        OK(pfc_save_checkpoint(h, path(p, sizeof p, "ckpt")));
        export_all(h, "");
        search(h, "search.bin");
    } else if (!strcmp(mode, "resume") && argc == 7) {
        int steps = atoi(argv[4]);
        const char *tag = argv[6];
        OK(pfc_load_checkpoint(h, path(p, sizeof p, "ckpt")));
        snprintf(name, sizeof name, "ckpt-%s", tag);
        OK(pfc_save_checkpoint(h, path(p, sizeof p, name)));
        snprintf(name, sizeof name, "-%s", tag);
        export_all(h, name);
        snprintf(name, sizeof name, "search-%s.bin", tag);
        search(h, name);
        /* The step numbers continue from the checkpoint's: the batches too. */
        uint64_t from = strtoull(argv[5], NULL, 10);
        for (int t = 0; t < steps; t++) step(h, from + (uint64_t)t);
        snprintf(name, sizeof name, "after-%s.npy", tag);
        OK(pfc_export_centers(h, path(p, sizeof p, name), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0));
    } else if (!strcmp(mode, "fail-save")) {
        step(h, 0);
        OK(pfc_save_checkpoint(h, path(p, sizeof p, "ckpt")));
        float q[DIM] = {1.0f};
        int64_t id;
        float score;
        int points = 0;
        for (long n = 0;; n++) {
            step(h, (uint64_t)n + 1);
            fail_at_ = calls_ + n;
            int st = pfc_save_checkpoint(h, path(p, sizeof p, "ckpt"));
            fail_at_ = -1;
            if (st == PFC_OK) break;
            if (st != PFC_ERR_COMMUNICATION) FAIL("save failing at its call %ld: status %d: %s", n, st, last_error());
            points++;
            /* Poisoned until a load, which restores a checkpoint every process can read. */
            st = pfc_search(h, q, 1, 1, &id, &score);
            if (st != PFC_ERR_COMMUNICATION) FAIL("search after a failed exchange: status %d: %s", st, last_error());
            OK(pfc_load_checkpoint(h, path(p, sizeof p, "ckpt")));
            OK(pfc_search(h, q, 1, 1, &id, &score));
        }
        printf("failure points %d\n", points);
        /* Exports: a failed exchange at any point leaves the previous file and nothing else. */
        char prev[8192];
        path(prev, sizeof prev, "c.npy");
        OK(pfc_export_centers(h, prev, PFC_FORMAT_NPY, PFC_DTYPE_F32, 0));
        FILE *f = fopen(prev, "rb");
        static unsigned char before[1 << 20], after[1 << 20];
        size_t len = fread(before, 1, sizeof before, f);
        fclose(f);
        step(h, 1000);
        int export_points = 0;
        for (long n = 0;; n++) {
            fail_at_ = calls_ + n;
            int st = pfc_export_centers(h, prev, PFC_FORMAT_NPY, PFC_DTYPE_F32, 0);
            fail_at_ = -1;
            if (st == PFC_OK) break;
            if (st != PFC_ERR_COMMUNICATION) FAIL("export failing at its call %ld: status %d: %s", n, st, last_error());
            export_points++;
            f = fopen(prev, "rb");
            size_t got = fread(after, 1, sizeof after, f);
            fclose(f);
            if (got != len || memcmp(before, after, len)) FAIL("a failed export changed %s", prev);
            OK(pfc_load_checkpoint(h, path(p, sizeof p, "ckpt")));
        }
        printf("export failure points %d\n", export_points);
        /* Other queries on one process: refused everywhere, with one message. */
        float other[DIM] = {1.0f};
        if (rank_ == size_ - 1) other[1] = 0.5f;
        int st = pfc_search(h, other, 1, 1, &id, &score);
        if (st != PFC_ERR_INVALID_ARGUMENT || !strstr(last_error(), "other queries")) FAIL("mismatched queries: status %d: %s", st, last_error());
        char mine[512] = {0}, all[512 * 64];
        snprintf(mine, sizeof mine, "%s", last_error());
        MPI_Allgather(mine, 512, MPI_CHAR, all, 512, MPI_CHAR, MPI_COMM_WORLD);
        for (int r = 0; r < size_; r++)
            if (strcmp(all + 512 * r, mine)) FAIL("process %d reported \"%s\", this one \"%s\"", r, all + 512 * r, mine);
        OK(pfc_search(h, q, 1, 1, &id, &score));
    } else if (!strcmp(mode, "save-once")) {
        step(h, 0);
        OK(pfc_save_checkpoint(h, path(p, sizeof p, "ckpt")));
    } else if (!strcmp(mode, "save-loop")) {
        printf("pid %d %ld\n", rank_, (long)getpid());
        fflush(stdout);
        for (uint64_t t = 0;; t++) {
            step(h, t);
            printf("saving %d %llu\n", rank_, (unsigned long long)(t + 1));
            fflush(stdout);
            OK(pfc_save_checkpoint(h, path(p, sizeof p, "ckpt")));
            if (rank_ == 0) {
                printf("saved %llu\n", (unsigned long long)(t + 1));
                fflush(stdout);
            }
        }
    } else {
        FAIL("unknown mode %s", mode);
    }
    pfc_destroy(h);
    printf("rank %d: done\n", rank_);
    MPI_Finalize();
    return 0;
}
