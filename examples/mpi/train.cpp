// The C++ binding over MPI: pfc::Config::allgather takes any callable — here a lambda around
// MPI_Allgather — and the Head keeps it alive. Trains a few steps on every process of
// MPI_COMM_WORLD, checks that every process reports the same loss, and that gradients come back.
//
//   mpicxx -std=c++17 -I include -I bindings/cpp examples/mpi/train.cpp -L target/release
//       -lpartialfc -Wl,-rpath,$PWD/target/release -o train_cpp
//   mpirun -n 3 ./train_cpp
#include "partialfc.hpp"

// MPI's C interface only (OpenMPI's and MPICH's deprecated C++ bindings warn under -Wextra).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int status = 0;
    try {
        pfc::Config cfg;
        cfg.num_classes = 1000;
        cfg.embedding_dim = 24;
        cfg.sample_rate = 0.3f;
        cfg.local_shards = 1 + static_cast<std::uint32_t>(rank % 2);  // uneven: 1, 2, 1, ...
        cfg.process_count = static_cast<std::uint32_t>(size);
        cfg.process_index = static_cast<std::uint32_t>(rank);
        MPI_Comm comm = MPI_COMM_WORLD;
        cfg.allgather = [comm](const void* send, std::size_t bytes, void* recv) {
            return MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes), MPI_BYTE, comm) == MPI_SUCCESS ? 0 : 1;
        };
        pfc::Head head(cfg);
        const std::size_t rows = 8, d = cfg.embedding_dim;
        std::vector<std::vector<float>> emb(cfg.local_shards, std::vector<float>(rows * d)), grad(emb);
        std::vector<std::vector<std::int64_t>> labels(cfg.local_shards, std::vector<std::int64_t>(rows));
        double loss = 0;
        for (int t = 0; t < 5; t++) {
            std::vector<pfc::Batch> batches;
            for (std::uint32_t s = 0; s < cfg.local_shards; s++) {
                for (std::size_t i = 0; i < rows; i++) {
                    labels[s][i] = static_cast<std::int64_t>((rank * 131 + s * 17 + i * 7 + t) % cfg.num_classes);
                    for (std::size_t j = 0; j < d; j++) emb[s][i * d + j] = std::sin(0.1f * static_cast<float>(labels[s][i] * 31 + j));
                }
                batches.emplace_back(emb[s], labels[s], grad[s]);
            }
            // Gradient accumulation across two computes, then one update.
            head.train_compute(batches);
            pfc::StepStats st = head.train_step(batches);
            loss = st.loss;
        }
        double all[64] = {0};
        MPI_Allgather(&loss, 1, MPI_DOUBLE, all, 1, MPI_DOUBLE, MPI_COMM_WORLD);
        for (int p = 0; p < size; p++)
            if (all[p] != loss) {
                std::fprintf(stderr, "rank %d: loss %.9g but process %d reports %.9g\n", rank, loss, p, all[p]);
                status = 1;
            }
        double norm = 0;
        for (auto& g : grad)
            for (float v : g) norm += static_cast<double>(v) * v;
        if (!(norm > 0) || !std::isfinite(norm)) {
            std::fprintf(stderr, "rank %d: no gradient came back\n", rank);
            status = 1;
        }
        if (rank == 0) std::printf("c++ over %d processes: loss %.4f on every process\n", size, loss);
    } catch (const pfc::Error& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        status = 1;
    }
    MPI_Finalize();
    return status;
}
