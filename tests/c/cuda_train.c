/* A C program training a PFC_BACKEND_CUDA head beside a CPU head on the same batches: losses,
 * embedding gradients and centers within 1e-4 after each step, at r = 1 and r = 0.3, f32, on one and
 * two GPUs. Run where the loader finds a CUDA driver: a GPU machine, or the host emulation
 * (LD_LIBRARY_PATH=target/cuda-emulator:.tools/nvrtc/nvidia/cu13/lib; tests/all/c_program.rs). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "partialfc.h"

enum { CLASSES = 3001, DIM = 64, ROWS = 48, STEPS = 3 };

static void must(int status, const char* what) {
    if (status != PFC_OK) {
        char message[512];
        pfc_last_error(message, sizeof message);
        fprintf(stderr, "%s: status %d: %s\n", what, status, message);
        exit(1);
    }
}

/* The square of the norm-wise relative error of `got` against `want`. */
static double rel2(const float* got, const float* want, size_t n) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        norm += (double)want[i] * want[i];
    }
    return diff / (norm > 1e-300 ? norm : 1e-300);
}

static uint64_t state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return ((double)(state >> 11) + 0.5) / 9007199254740992.0;
}

static int compare(float rate, uint32_t gpus) {
    pfc_config cfg;
    pfc_config_init(&cfg);
    cfg.num_classes = CLASSES;
    cfg.embedding_dim = DIM;
    cfg.sample_rate = rate;
    cfg.local_shards = gpus;
    pfc_head* cpu = NULL;
    pfc_head* gpu = NULL;
    must(pfc_create(&cfg, &cpu), "pfc_create(CPU)");
    int32_t devices[2] = {0, 1};
    cfg.backend = PFC_BACKEND_CUDA;
    cfg.devices = devices;
    must(pfc_create(&cfg, &gpu), "pfc_create(CUDA)");

    static float emb[ROWS * DIM], grad_cpu[ROWS * DIM], grad_gpu[ROWS * DIM];
    static float centers_cpu[CLASSES * DIM], centers_gpu[CLASSES * DIM];
    static int64_t labels[ROWS];
    int failures = 0;
    for (int step = 0; step < STEPS; step++) {
        for (size_t i = 0; i < ROWS * DIM; i++) emb[i] = (float)(2.0 * uniform() - 1.0);
        for (size_t i = 0; i < ROWS; i++) labels[i] = (int64_t)(uniform() * CLASSES);
        pfc_batch batches[2][2];
        float* grads[2] = {grad_cpu, grad_gpu};
        pfc_step_stats stats[2];
        for (int h = 0; h < 2; h++) {
            for (uint32_t s = 0; s < gpus; s++) {
                const size_t first = s * (ROWS / gpus), rows = (s + 1 == gpus) ? ROWS - first : ROWS / gpus;
                pfc_batch b = {emb + first * DIM, labels + first, grads[h] + first * DIM, rows, PFC_DTYPE_F32, PFC_MEMORY_HOST, NULL};
                batches[h][s] = b;
            }
            must(pfc_train_step(h == 0 ? cpu : gpu, batches[h], gpus, &stats[h]), "pfc_train_step");
        }
        must(pfc_get_centers(cpu, 0, CLASSES, 0, centers_cpu), "pfc_get_centers(CPU)");
        must(pfc_get_centers(gpu, 0, CLASSES, 0, centers_gpu), "pfc_get_centers(CUDA)");
        const double loss = (stats[1].loss - stats[0].loss) / stats[0].loss;
        const double g2 = rel2(grad_gpu, grad_cpu, ROWS * DIM), w2 = rel2(centers_gpu, centers_cpu, (size_t)CLASSES * DIM);
        if (!(loss * loss <= 1e-8 && g2 <= 1e-8 && w2 <= 1e-8) || stats[0].sampled_classes != stats[1].sampled_classes) {
            fprintf(stderr, "r %.1f, %u GPUs, step %d: loss %.3g, squared gradient %.3g, squared centers %.3g apart\n", rate,
                    gpus, step, loss, g2, w2);
            failures++;
        }
    }
    pfc_destroy(cpu);
    pfc_destroy(gpu);
    return failures;
}

int main(void) {
    int failures = 0;
    failures += compare(1.0f, 1);
    failures += compare(0.3f, 1);
    failures += compare(0.3f, 2);
    if (failures) return 1;
#ifdef __cplusplus
    printf("cuda train (C++17): 3 runs of %d steps within 1e-4 of the CPU backend\n", STEPS);
#else
    printf("cuda train (C11): 3 runs of %d steps within 1e-4 of the CPU backend\n", STEPS);
#endif
    return 0;
}
