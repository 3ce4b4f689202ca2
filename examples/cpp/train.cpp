// A C++ training loop over bindings/cpp/partialfc.hpp: a linear "backbone" maps synthetic inputs of
// 300 identities to embeddings, the PartialFC head (two local shards, half the classes sampled per
// step) returns the embedding gradient, the backbone learns from it. Then it evaluates held-out
// samples, identifies them with Head::search, saves a checkpoint, exports the centers and writes the
// held-out embeddings as queries for the Go example (examples/go/identify).
//
//   against an installed partialfc (cargo cinstall --prefix <prefix>), with CMake:
//     cmake -S examples/cpp -B build/cpp -DCMAKE_PREFIX_PATH=<prefix> && cmake --build build/cpp
//   or inside the repository, after cargo build --release --lib:
//     g++ -std=c++17 -O2 -I include -I bindings/cpp examples/cpp/train.cpp -o pfc_train_cpp
//         -L target/release -lpartialfc -Wl,-rpath,$PWD/target/release     (shared), or
//         target/release/libpartialfc.a -lpthread -ldl -lm                  (static)
//   ./pfc_train_cpp [out-dir (default pfc-out/cpp)] [steps]
//
// Writes out/checkpoint/ (pfc_save_checkpoint), out/centers.npy (normalized f32),
// out/centers.fvecs, out/centers.faiss, out/centers.safetensors (f16) and out/queries.txt (one query a line: "id=<identity>" then the embedding).
#include "partialfc.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr std::uint64_t kIdentities = 300;
constexpr std::size_t kInput = 48;      // input features
constexpr std::uint32_t kDim = 32;      // embedding dimension
constexpr std::size_t kBatch = 96;      // samples per step, split over two shards
constexpr std::size_t kHeldOut = 200;   // held-out samples for evaluation and queries

struct Data {
    std::mt19937_64 rng{2024};
    std::vector<float> prototypes = std::vector<float>(kIdentities * kInput);

    Data() {
        std::normal_distribution<float> n(0.0f, 1.0f);
        for (auto& v : prototypes) v = n(rng);
    }
    // One noisy sample of identity `id` into x (kInput values).
    void sample(std::int64_t id, float* x) {
        std::normal_distribution<float> n(0.0f, 0.6f);
        for (std::size_t j = 0; j < kInput; j++) x[j] = prototypes[static_cast<std::size_t>(id) * kInput + j] + n(rng);
    }
};

// e = A·x for each row; A is kDim × kInput.
void forward(const std::vector<float>& a, const std::vector<float>& x, std::size_t rows, std::vector<float>& e) {
    e.assign(rows * kDim, 0.0f);
    for (std::size_t i = 0; i < rows; i++) {
        for (std::size_t o = 0; o < kDim; o++) {
            float s = 0.0f;
            for (std::size_t j = 0; j < kInput; j++) s += a[o * kInput + j] * x[i * kInput + j];
            e[i * kDim + o] = s;
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    const std::filesystem::path out = argc > 1 ? argv[1] : "pfc-out/cpp";
    const int steps = argc > 2 ? std::atoi(argv[2]) : 300;
    std::filesystem::create_directories(out);

    try {
        pfc::Config cfg;                 // the library's defaults
        cfg.num_classes = kIdentities;
        cfg.embedding_dim = kDim;
        cfg.sample_rate = 0.5f;          // PartialFC: positives + half of each shard's classes
        cfg.local_shards = 2;            // two CPU shards
        cfg.scale = 32.0f;
        cfg.m2 = 0.3f;
        cfg.lr = 0.5f;
        cfg.seed = 7;
        pfc::Head head(cfg);
        std::printf("partialfc %s: %llu identities, d = %u, %u shards, sample rate %.2f\n", pfc::version().c_str(),
                    static_cast<unsigned long long>(cfg.num_classes), cfg.embedding_dim, cfg.local_shards,
                    static_cast<double>(cfg.sample_rate));

        Data data;
        std::vector<float> a(kDim * kInput);  // the backbone
        {
            std::normal_distribution<float> n(0.0f, 1.0f / std::sqrt(static_cast<float>(kInput)));
            for (auto& v : a) v = n(data.rng);
        }
        std::uniform_int_distribution<std::int64_t> pick(0, static_cast<std::int64_t>(kIdentities) - 1);
        std::vector<float> x(kBatch * kInput), emb, grad(kBatch * kDim), da(kDim * kInput);
        std::vector<std::int64_t> labels(kBatch);
        const float backbone_lr = 0.05f;
        const std::size_t first_rows = kBatch / 2 + 5;  // uneven shards on purpose

        double first_loss = 0.0, last_loss = 0.0;
        for (int step = 0; step < steps; step++) {
            for (std::size_t i = 0; i < kBatch; i++) {
                labels[i] = pick(data.rng);
                data.sample(labels[i], &x[i * kInput]);
            }
            forward(a, x, kBatch, emb);
            const pfc::span<const float> e(emb);
            const pfc::span<const std::int64_t> l(labels);
            const pfc::span<float> g(grad);
            const std::vector<pfc::Batch> batches{
                pfc::Batch(e.subspan(0, first_rows * kDim), l.subspan(0, first_rows), g.subspan(0, first_rows * kDim)),
                pfc::Batch(e.subspan(first_rows * kDim), l.subspan(first_rows), g.subspan(first_rows * kDim)),
            };
            const pfc::StepStats st = head.train_step(batches);
            if (step == 0) first_loss = st.loss;
            last_loss = st.loss;
            if (step % 50 == 0 || step + 1 == steps) {
                std::printf("step %4llu  loss %.4f  accuracy %.3f  sampled %llu\n",
                            static_cast<unsigned long long>(st.step), st.loss, st.accuracy,
                            static_cast<unsigned long long>(st.sampled_classes));
            }
            // grad is world_size × ∂loss/∂e; one backbone serves both shards, so divide by world_size.
            std::fill(da.begin(), da.end(), 0.0f);
            for (std::size_t i = 0; i < kBatch; i++) {
                for (std::size_t o = 0; o < kDim; o++) {
                    const float go = grad[i * kDim + o] / static_cast<float>(cfg.local_shards);
                    for (std::size_t j = 0; j < kInput; j++) da[o * kInput + j] += go * x[i * kInput + j];
                }
            }
            for (std::size_t k = 0; k < a.size(); k++) a[k] -= backbone_lr * da[k];
            if (step == steps * 2 / 3) head.set_learning_rate(cfg.lr * 0.1f);  // a step schedule
        }

        // Held-out samples: evaluation over all classes, then identification by search.
        std::vector<float> hx(kHeldOut * kInput), hemb;
        std::vector<std::int64_t> hlabels(kHeldOut);
        for (std::size_t i = 0; i < kHeldOut; i++) {
            hlabels[i] = pick(data.rng);
            data.sample(hlabels[i], &hx[i * kInput]);
        }
        forward(a, hx, kHeldOut, hemb);
        const pfc::span<const float> he(hemb);
        const pfc::span<const std::int64_t> hl(hlabels);
        const std::vector<pfc::Batch> eval{pfc::Batch(he.subspan(0, kHeldOut / 2 * kDim), hl.subspan(0, kHeldOut / 2)),
                                           pfc::Batch(he.subspan(kHeldOut / 2 * kDim), hl.subspan(kHeldOut / 2))};
        const pfc::StepStats ev = head.evaluate(eval);
        const pfc::SearchResult hits = head.search(hemb, 5);
        std::size_t top1 = 0, top5 = 0;
        for (std::size_t q = 0; q < kHeldOut; q++) {
            top1 += hits.id(q, 0) == hlabels[q];
            for (std::uint32_t r = 0; r < hits.k; r++) top5 += hits.id(q, r) == hlabels[q];
        }
        std::printf("held out: loss %.4f  accuracy %.3f  identification top-1 %.3f  top-5 %.3f\n", ev.loss, ev.accuracy,
                    static_cast<double>(top1) / kHeldOut, static_cast<double>(top5) / kHeldOut);

        head.save_checkpoint((out / "checkpoint").string());
        head.export_centers((out / "centers.npy").string(), pfc::Format::Npy, pfc::DType::F32, /*normalized=*/true);
        head.export_centers((out / "centers.fvecs").string(), pfc::Format::Fvecs);
        head.export_centers((out / "centers.faiss").string(), pfc::Format::Faiss);
        head.export_centers((out / "centers.safetensors").string(), pfc::Format::Safetensors, pfc::DType::F16);
        std::ofstream queries(out / "queries.txt");
        for (std::size_t q = 0; q < kHeldOut; q++) {
            queries << "id=" << hlabels[q];
            for (std::size_t j = 0; j < kDim; j++) queries << ' ' << hemb[q * kDim + j];
            queries << '\n';
        }
        if (!queries) {
            std::fprintf(stderr, "cannot write %s\n", (out / "queries.txt").c_str());
            return 1;
        }
        std::printf("wrote %s/{checkpoint/, centers.npy, centers.fvecs, centers.safetensors, queries.txt}\n", out.c_str());
        std::printf("loss %.4f -> %.4f\n", first_loss, last_loss);
        return last_loss < first_loss ? 0 : 2;
    } catch (const pfc::Error& e) {
        std::fprintf(stderr, "partialfc error (%s): %s\n", pfc::status_name(e.status()), e.what());
        return 1;
    }
}
