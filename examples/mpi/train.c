/* A training loop over MPI processes: one partialfc head spread over every process of
 * MPI_COMM_WORLD, MPI_Allgather as the library's all-gather (SPEC §2a). Each process drives its
 * local shards (threads of work on the CPU backend, GPUs on the CUDA one), feeds them its part of
 * the global batch, and takes back the gradients for its own embeddings.
 *
 *   mpicc -I include examples/mpi/train.c -L target/release -lpartialfc -Wl,-rpath,$PWD/target/release -lm -o train
 *   mpirun -n 2 ./train [classes] [shards-per-process] [steps]
 *
 * (as root add --allow-run-as-root; with more processes than cores, --oversubscribe)
 */
#include "partialfc.h"

#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* The host's process group: every process calls it with the same `bytes`. */
static int32_t mpi_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    MPI_Comm comm = *(MPI_Comm *)ctx;
    if (bytes > (size_t)INT32_MAX) return 2; /* larger exchanges need a derived datatype */
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, comm) == MPI_SUCCESS ? 0 : 1;
}

static void die(int rank, const char *what, pfc_status st) {
    char msg[512];
    pfc_last_error(msg, sizeof msg);
    fprintf(stderr, "rank %d: %s failed (%d): %s\n", rank, what, st, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* Deterministic synthetic data: class c's samples lie around a fixed random direction. */
static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}
static float unit_noise(uint64_t a, uint64_t b) { return (float)((mix(a * 0x9e3779b97f4a7c15ULL + b) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const uint64_t classes = argc > 1 ? strtoull(argv[1], NULL, 10) : 2000;
    const uint32_t shards = argc > 2 ? (uint32_t)atoi(argv[2]) : 1;
    const int steps = argc > 3 ? atoi(argv[3]) : 30;
    const uint32_t d = 32, rows = 16; /* rows per shard */

    MPI_Comm comm = MPI_COMM_WORLD;
    pfc_config cfg;
    pfc_config_init(&cfg);
    cfg.num_classes = classes;
    cfg.embedding_dim = d;
    cfg.sample_rate = 0.2f;
    cfg.scale = 16.0f;
    cfg.lr = 0.5f;
    cfg.local_shards = shards;
    cfg.process_count = (uint32_t)size;
    cfg.process_index = (uint32_t)rank;
    cfg.allgather = mpi_allgather;
    cfg.allgather_ctx = &comm;
    pfc_head *head = NULL;
    pfc_status st = pfc_create(&cfg, &head); /* collective: every process creates its part */
    if (st != PFC_OK) die(rank, "pfc_create", st);
    uint64_t first, count;
    pfc_local_classes(head, &first, &count);
    printf("rank %d: classes [%llu, %llu) on %u shards\n", rank, (unsigned long long)first, (unsigned long long)(first + count), shards);

    float *emb = malloc(sizeof(float) * shards * rows * d), *grad = malloc(sizeof(float) * shards * rows * d);
    int64_t *labels = malloc(sizeof(int64_t) * shards * rows);
    double first_loss = 0, last_loss = 0;
    for (int t = 0; t < steps; t++) {
        pfc_batch b[64];
        for (uint32_t s = 0; s < shards; s++) {
            for (uint32_t i = 0; i < rows; i++) {
                uint64_t sample = ((uint64_t)t * 1000003 + (uint64_t)rank * 7919 + s * 104729 + i);
                int64_t c = (int64_t)(mix(sample) % (classes < 200 ? classes : 200)); /* 200 busy identities */
                labels[s * rows + i] = c;
                for (uint32_t j = 0; j < d; j++)
                    emb[(s * rows + i) * d + j] = unit_noise((uint64_t)c, j) + 0.3f * unit_noise(sample, j + 1000);
            }
            b[s] = (pfc_batch){.embeddings = emb + s * rows * d, .labels = labels + s * rows, .grad_embeddings = grad + s * rows * d,
                               .batch_size = rows, .dtype = PFC_DTYPE_F32, .memory = PFC_MEMORY_HOST};
        }
        pfc_step_stats stats;
        st = pfc_train_step(head, b, shards, &stats); /* collective */
        if (st != PFC_OK) die(rank, "pfc_train_step", st);
        /* ... backpropagate grad through this process's backbone ... */
        if (t == 0) first_loss = stats.loss;
        last_loss = stats.loss;
        if (rank == 0 && (t % 10 == 0 || t == steps - 1))
            printf("step %llu: loss %.4f accuracy %.3f over %llu rows, %llu classes sampled\n", (unsigned long long)stats.step, stats.loss,
                   stats.accuracy, (unsigned long long)stats.global_batch, (unsigned long long)stats.sampled_classes);
    }
    int learned = isfinite(last_loss) && last_loss < first_loss;
    if (rank == 0) printf("loss %.4f -> %.4f: %s\n", first_loss, last_loss, learned ? "learning" : "NOT learning");
    free(emb);
    free(grad);
    free(labels);
    pfc_destroy(head); /* local: never waits for other processes */
    MPI_Finalize();
    return learned ? 0 : 1;
}
