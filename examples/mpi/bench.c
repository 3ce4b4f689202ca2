/* Step time of one job over MPI processes (the multi-process recipe of docs/benchmarks.md):
 *
 *   mpirun -n P ./bench CLASSES SAMPLE_RATE GLOBAL_BATCH SHARDS_PER_PROCESS STEPS [DIM]
 *
 * Every process drives SHARDS_PER_PROCESS CPU shards; the global batch is split evenly over all
 * shards. Each timed step starts after a barrier and lasts until the slowest process returns; the
 * median over STEPS (after two warm-up steps) is printed by process 0, with the exchanges the
 * library made through the callback and the bytes they moved per step.
 */
#include "partialfc.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    MPI_Comm comm;
    long calls;
    double bytes;
} group_t;

static int32_t mpi_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    group_t *g = ctx;
    g->calls++;
    g->bytes += (double)bytes;
    if (bytes > (size_t)INT32_MAX) return 2;
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, g->comm) == MPI_SUCCESS ? 0 : 1;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc < 6) {
        if (rank == 0) fprintf(stderr, "usage: bench CLASSES SAMPLE_RATE GLOBAL_BATCH SHARDS_PER_PROCESS STEPS [DIM]\n");
        MPI_Finalize();
        return 2;
    }
    const uint64_t classes = strtoull(argv[1], NULL, 10);
    const float rate = strtof(argv[2], NULL);
    const uint64_t batch = strtoull(argv[3], NULL, 10);
    const uint32_t shards = (uint32_t)atoi(argv[4]);
    const int steps = atoi(argv[5]);
    const uint32_t d = argc > 6 ? (uint32_t)atoi(argv[6]) : 512;
    const uint64_t world = (uint64_t)shards * (uint64_t)size;

    group_t g = {MPI_COMM_WORLD, 0, 0};
    pfc_config cfg;
    pfc_config_init(&cfg);
    cfg.num_classes = classes;
    cfg.embedding_dim = d;
    cfg.sample_rate = rate;
    cfg.local_shards = shards;
    cfg.process_count = (uint32_t)size;
    cfg.process_index = (uint32_t)rank;
    cfg.allgather = mpi_allgather;
    cfg.allgather_ctx = &g;
    pfc_head *head = NULL;
    if (pfc_create(&cfg, &head) != PFC_OK) {
        char msg[512];
        pfc_last_error(msg, sizeof msg);
        fprintf(stderr, "rank %d: pfc_create: %s\n", rank, msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    pfc_batch b[64];
    uint64_t state = 0x9e3779b97f4a7c15ULL ^ (uint64_t)rank;
    for (uint32_t s = 0; s < shards; s++) {
        uint64_t r = (uint64_t)rank * shards + s;
        uint64_t rows = batch / world + (r < batch % world);
        float *e = malloc(sizeof(float) * rows * d), *gr = malloc(sizeof(float) * rows * d);
        int64_t *l = malloc(sizeof(int64_t) * rows);
        for (uint64_t i = 0; i < rows * d; i++) {
            state ^= state << 13, state ^= state >> 7, state ^= state << 17;
            e[i] = (float)(state >> 40) / (float)(1 << 24) - 0.5f;
        }
        for (uint64_t i = 0; i < rows; i++) {
            state ^= state << 13, state ^= state >> 7, state ^= state << 17;
            l[i] = (int64_t)(state % classes);
        }
        b[s] = (pfc_batch){.embeddings = e, .labels = l, .grad_embeddings = gr, .batch_size = rows, .dtype = PFC_DTYPE_F32, .memory = PFC_MEMORY_HOST};
    }
    double *times = malloc(sizeof(double) * (size_t)steps);
    long calls0 = 0;
    double bytes0 = 0;
    for (int t = 0; t < steps + 2; t++) {
        if (t == 2) calls0 = g.calls, bytes0 = g.bytes;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        pfc_step_stats st;
        if (pfc_train_step(head, b, shards, &st) != PFC_OK) MPI_Abort(MPI_COMM_WORLD, 1);
        double dt = MPI_Wtime() - t0, slowest;
        MPI_Allreduce(&dt, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (t >= 2) times[t - 2] = slowest;
    }
    qsort(times, (size_t)steps, sizeof(double), cmp);
    if (rank == 0)
        printf("processes %d x shards %u: C %llu r %g N %llu d %u: median step %.3f s (min %.3f, max %.3f); %.1f exchanges, %.1f MiB sent per process per step\n",
               size, shards, (unsigned long long)classes, rate, (unsigned long long)batch, d, times[steps / 2], times[0], times[steps - 1],
               (double)(g.calls - calls0) / steps, (g.bytes - bytes0) / steps / (1 << 20));
    pfc_destroy(head);
    MPI_Finalize();
    return 0;
}
