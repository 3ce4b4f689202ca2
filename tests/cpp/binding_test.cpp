// Test of bindings/cpp/partialfc.hpp, built and run by tests/all/bindings.rs:
//   g++ -std=c++17 -Wall -Wextra -Werror -pedantic -I include -I bindings/cpp tests/cpp/binding_test.cpp
//       -L<lib> -lpartialfc -Wl,-rpath,<lib>
//   ./binding_test <scratch directory>
// Prints "c++ binding: N checks passed" and exits 0 on success; prints the failed check and exits 1.
#include "partialfc.hpp"

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

namespace fs = std::filesystem;

static unsigned checks_passed = 0;

#define CHECK(cond)                                                                         \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            std::fprintf(stderr, "c++ binding: FAILED at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            std::exit(1);                                                                   \
        }                                                                                   \
        checks_passed++;                                                                    \
    } while (0)

// Expects `expr` to throw pfc::Error with status `want` whose message mentions `needle`.
#define EXPECT_ERROR(expr, want, needle)                                                                  \
    do {                                                                                                  \
        bool thrown_ = false;                                                                             \
        try {                                                                                             \
            (void)(expr);                                                                                 \
        } catch (const pfc::Error& e_) {                                                                  \
            thrown_ = true;                                                                               \
            if (e_.status() != (want) || e_.message().find(needle) == std::string::npos ||               \
                std::string(e_.what()).find(e_.message()) == std::string::npos) {                         \
                std::fprintf(stderr, "c++ binding: FAILED at %s:%d: %s threw %s, expected %s mentioning \"%s\"\n", \
                             __FILE__, __LINE__, #expr, e_.what(), pfc::status_name(want), needle);       \
                std::exit(1);                                                                             \
            }                                                                                             \
        }                                                                                                 \
        if (!thrown_) {                                                                                   \
            std::fprintf(stderr, "c++ binding: FAILED at %s:%d: %s did not throw\n", __FILE__, __LINE__, #expr); \
            std::exit(1);                                                                                 \
        }                                                                                                 \
        checks_passed++;                                                                                  \
    } while (0)

// ------------------------------------------------------------------------------------------------
// A synthetic identification problem: C identities with random prototypes, noisy embeddings.

constexpr std::uint64_t C = 64;
constexpr std::uint32_t D = 16;
constexpr std::size_t N = 48;

static std::uint64_t rng_state = 0x243f6a8885a308d3ull;

static float uniform() {  // in [-1, 1)
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>((rng_state >> 40) & 0xffffffu) / 8388608.0f - 1.0f;
}

struct Problem {
    std::vector<float> prototypes;  // C × D
    std::vector<float> emb;         // N × D
    std::vector<std::int64_t> labels;
};

static Problem make_problem() {
    Problem p;
    p.prototypes.resize(C * D);
    for (auto& v : p.prototypes) v = uniform();
    p.labels.resize(N);
    p.emb.resize(N * D);
    for (std::size_t i = 0; i < N; i++) {
        p.labels[i] = static_cast<std::int64_t>((i * 7 + 3) % C);
        for (std::size_t j = 0; j < D; j++) {
            p.emb[i * D + j] = 3.0f * (p.prototypes[p.labels[i] * D + j] + 0.3f * uniform());
        }
    }
    return p;
}

static pfc::Config base_config(std::uint32_t shards) {
    pfc::Config cfg;
    cfg.num_classes = C;
    cfg.embedding_dim = D;
    cfg.local_shards = shards;
    cfg.seed = 11;
    cfg.scale = 16.0f;
    cfg.m2 = 0.2f;
    cfg.lr = 0.5f;
    return cfg;
}

static std::vector<float> all_centers(const pfc::Head& h) { return h.centers(0, C); }

static std::vector<char> read_file(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

static void write_file(const fs::path& p, const std::vector<char>& bytes) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Field by field (padding bytes are unspecified).
static bool same_config(const pfc_config& a, const pfc_config& b) {
    return a.struct_size == b.struct_size && a.num_classes == b.num_classes && a.embedding_dim == b.embedding_dim &&
           a.sample_rate == b.sample_rate && a.scale == b.scale && a.m1 == b.m1 && a.m2 == b.m2 && a.m3 == b.m3 &&
           a.interclass_filter == b.interclass_filter && a.margin_grad == b.margin_grad &&
           a.arcface_fallback == b.arcface_fallback && a.optimizer == b.optimizer && a.lr == b.lr &&
           a.momentum == b.momentum && a.weight_decay == b.weight_decay && a.beta1 == b.beta1 && a.beta2 == b.beta2 &&
           a.eps == b.eps && a.compute_dtype == b.compute_dtype && a.seed == b.seed && a.init_std == b.init_std &&
           a.backend == b.backend && a.local_shards == b.local_shards && a.devices == b.devices &&
           a.world_size == b.world_size && a.first_rank == b.first_rank && a.nccl_id == b.nccl_id &&
           a.margin_kind == b.margin_kind && a.margin_m == b.margin_m && a.adaface_h == b.adaface_h &&
           a.adaface_t_alpha == b.adaface_t_alpha && a.storage_dtype == b.storage_dtype;
}

// ------------------------------------------------------------------------------------------------

static void test_types_and_config() {
    static_assert(!std::is_copy_constructible<pfc::Head>::value, "Head is move-only");
    static_assert(!std::is_copy_assignable<pfc::Head>::value, "Head is move-only");
    static_assert(std::is_nothrow_move_constructible<pfc::Head>::value, "Head moves without throwing");
    static_assert(std::is_nothrow_move_assignable<pfc::Head>::value, "Head moves without throwing");

    const std::string v = pfc::version();
    CHECK(!v.empty() && v == pfc_version());

    // An NCCL id where NCCL loads, PFC_ERR_UNAVAILABLE (with a message) where it does not.
    try {
        CHECK(pfc::nccl_unique_id().size() == PFC_NCCL_ID_BYTES);
    } catch (const pfc::Error& e) {
        CHECK(e.status() == pfc::Status::Unavailable && e.function() == "pfc_nccl_unique_id" && !e.message().empty());
    }

    // Config{} holds the library's defaults.
    pfc::Config cfg;
    pfc_config c;
    pfc_config_init(&c);
    CHECK(cfg.num_classes == 0 && cfg.embedding_dim == 0);
    CHECK(cfg.scale == 64.0f && cfg.m1 == 1.0f && cfg.m2 == 0.5f && cfg.m3 == 0.0f);
    CHECK(cfg.sample_rate == 1.0f && cfg.interclass_filter == 0.0f);
    CHECK(cfg.optimizer == pfc::Optimizer::Sgd && cfg.lr == 0.1f && cfg.momentum == 0.9f && cfg.weight_decay == 5e-4f);
    CHECK(cfg.beta1 == 0.9f && cfg.beta2 == 0.999f && cfg.eps == 1e-8f && cfg.init_std == 0.01f);
    CHECK(cfg.compute_dtype == pfc::DType::F32 && cfg.storage_dtype == pfc::DType::F32 && cfg.backend == pfc::Backend::Cpu);
    CHECK(cfg.margin_grad == pfc::MarginGrad::StraightThrough && !cfg.arcface_fallback);
    CHECK(cfg.margin_kind == pfc::MarginKind::Combined && cfg.margin_m == 0.0f && cfg.adaface_h == 0.333f && cfg.adaface_t_alpha == 0.01f);
    CHECK(cfg.local_shards == 1 && cfg.devices.empty() && cfg.world_size == 0 && cfg.first_rank == 0);
    CHECK(cfg.seed == c.seed && cfg.nccl_id.empty());
    const pfc_config back = cfg.to_c();
    CHECK(same_config(back, c));

    cfg.devices = {0, 1};
    cfg.local_shards = 2;
    cfg.optimizer = pfc::Optimizer::AdamW;
    cfg.storage_dtype = pfc::DType::BF16;
    const pfc_config c2 = cfg.to_c();
    CHECK(c2.devices == cfg.devices.data() && c2.local_shards == 2 && c2.optimizer == PFC_OPTIMIZER_ADAMW);
    CHECK(c2.storage_dtype == PFC_DTYPE_BF16);
    const pfc::Config round = pfc::Config::from_c(c2);
    CHECK(round.devices == cfg.devices && round.optimizer == pfc::Optimizer::AdamW && round.storage_dtype == pfc::DType::BF16);

    // span views.
    std::vector<float> vec(6, 1.0f);
    const std::vector<float>& cvec = vec;
    std::array<float, 3> arr{1.0f, 2.0f, 3.0f};
    float raw[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    pfc::span<float> s1 = vec;
    pfc::span<const float> s2 = cvec;
    pfc::span<const float> s3 = s1;
    pfc::span<float> s4 = arr;
    pfc::span<const float> s5 = raw;
    pfc::span<const float> s6(raw + 1, 2);
    CHECK(s1.size() == 6 && s1.data() == vec.data() && s2.size() == 6 && s3.data() == vec.data());
    CHECK(s4.size() == 3 && s4[2] == 3.0f && s5.size() == 4 && s6[1] == 2.0f && s6.size_bytes() == 8);
    CHECK(s5.subspan(1).size() == 3 && s5.subspan(1, 2)[1] == 2.0f && pfc::span<int>().empty());
    float sum = 0.0f;
    for (float x : s5) sum += x;
    CHECK(sum == 6.0f);
    static_assert(!std::is_constructible<pfc::span<float>, const std::vector<float>&>::value, "no const to mutable");
    static_assert(!std::is_constructible<pfc::span<float>, std::vector<double>&>::value, "no element conversion");
}

// AdaFace through the binding: its running statistics start at 20 and 100, move with a step and
// are restored as saved; a malformed list is refused and changes nothing.
static void test_adaface(Problem& p) {
    pfc::Config cfg = base_config(1);
    cfg.margin_kind = pfc::MarginKind::AdaFace;
    cfg.m2 = pfc::Config().m2;  // the combined margin's option, at its default beside AdaFace
    pfc::Head head(cfg);
    CHECK((head.margin_state() == std::vector<float>{20.0f, 100.0f}));
    std::vector<float> grad(N * D, 0.0f);
    std::vector<pfc::Batch> batches{pfc::Batch(pfc::span<const float>(p.emb), pfc::span<const std::int64_t>(p.labels), pfc::span<float>(grad))};
    const pfc::StepStats st = head.train_step(batches);
    CHECK(std::isfinite(st.loss) && st.loss > 0.0);
    const std::vector<float> state = head.margin_state();
    CHECK(state.size() == 2 && state[0] != 20.0f && state[1] != 100.0f);
    const std::vector<float> saved{20.0f, 100.0f};
    head.set_margin_state(saved);
    CHECK(head.margin_state() == saved);
    try {
        head.set_margin_state(pfc::span<const float>(saved.data(), 1));
        CHECK(false);
    } catch (const pfc::Error& e) {
        CHECK(e.status() == pfc::Status::InvalidArgument && head.margin_state() == saved);
    }
    CHECK(pfc::Head(base_config(1)).margin_state().empty());
    cfg.m2 = 0.3f;
    try {
        pfc::Head bad(cfg);
        CHECK(false);
    } catch (const pfc::Error& e) {
        CHECK(e.status() == pfc::Status::InvalidArgument && e.message().find("m2") == 0);
    }
}

static void test_create_errors() {
    pfc::Config cfg = base_config(1);
    cfg.num_classes = 0;
    try {
        pfc::Head h(cfg);
        CHECK(false);
    } catch (const pfc::Error& e) {
        CHECK(e.status() == pfc::Status::InvalidArgument && e.code() == PFC_ERR_INVALID_ARGUMENT);
        CHECK(e.function() == "pfc_create");
        CHECK(e.message().find("num_classes") != std::string::npos);
        CHECK(std::string(e.what()).find("pfc_create: PFC_ERR_INVALID_ARGUMENT: ") == 0);
    }
    // pfc::Error is a std::runtime_error.
    bool caught = false;
    try {
        pfc::Head h(cfg);
    } catch (const std::runtime_error& e) {
        caught = std::string(e.what()).find("num_classes") != std::string::npos;
    }
    CHECK(caught);

    cfg = base_config(1);
    cfg.backend = pfc::Backend::Cuda;
    EXPECT_ERROR(pfc::Head(cfg), pfc::Status::Unavailable, "CUDA");
    cfg = base_config(1);
    cfg.sample_rate = 2.0f;
    EXPECT_ERROR(pfc::Head(cfg), pfc::Status::InvalidArgument, "sample_rate");
    cfg = base_config(1);
    cfg.optimizer = static_cast<pfc::Optimizer>(7);
    EXPECT_ERROR(pfc::Head(cfg), pfc::Status::InvalidArgument, "optimizer");
    cfg = base_config(2);
    cfg.devices = {0};
    EXPECT_ERROR(pfc::Head(cfg), pfc::Status::InvalidArgument, "devices");
    cfg = base_config(1);
    cfg.nccl_id = {1, 2, 3};
    EXPECT_ERROR(pfc::Head(cfg), pfc::Status::InvalidArgument, "nccl_id");
}

// Two shards with uneven batches: the loss falls, evaluation agrees, every error path leaves the
// head unchanged.
static void test_training_and_errors(Problem& p) {
    pfc::Head head(base_config(2));
    CHECK(static_cast<bool>(head) && head.get() != nullptr && head.embedding_dim() == D);
    const pfc::ClassRange lc = head.local_classes();
    CHECK(lc.first == 0 && lc.count == C);

    const std::size_t rows0 = 30, rows1 = N - rows0;
    std::vector<float> grad(N * D, 0.0f);
    pfc::span<const float> e(p.emb);
    pfc::span<const std::int64_t> l(p.labels);
    pfc::span<float> g(grad);
    std::vector<pfc::Batch> batches{
        pfc::Batch(e.subspan(0, rows0 * D), l.subspan(0, rows0), g.subspan(0, rows0 * D)),
        pfc::Batch(e.subspan(rows0 * D), l.subspan(rows0), g.subspan(rows0 * D)),
    };
    CHECK(batches[0].rows() == rows0 && batches[1].rows() == rows1 && batches[0].dtype() == pfc::DType::F32);

    const pfc::StepStats ev = head.evaluate(batches);
    CHECK(ev.step == 0 && ev.global_batch == N && ev.sampled_classes == C && ev.loss > 0.0);
    double first = 0.0, last = 0.0;
    for (int t = 0; t < 10; t++) {
        const pfc::StepStats st = head.train_step(batches);
        CHECK(st.step == static_cast<std::uint64_t>(t) + 1 && st.global_batch == N && std::isfinite(st.loss));
        if (t == 0) first = st.loss;
        last = st.loss;
    }
    CHECK(last < 0.7 * first);
    double gnorm = 0.0;
    for (float x : grad) gnorm += std::fabs(x);
    CHECK(std::isfinite(gnorm) && gnorm > 0.0);
    const pfc::StepStats ev2 = head.evaluate(batches);
    CHECK(ev2.loss < ev.loss && ev2.step == 10 && ev2.accuracy >= ev.accuracy);

    // A bad label: PFC_ERR_INVALID_ARGUMENT naming the label; centers and gradient untouched.
    const std::vector<float> before = all_centers(head);
    std::fill(grad.begin(), grad.end(), 7.0f);
    p.labels[N - 1] = static_cast<std::int64_t>(C);
    EXPECT_ERROR(head.train_step(batches), pfc::Status::InvalidArgument, "label");
    p.labels[N - 1] = -3;
    EXPECT_ERROR(head.evaluate(batches), pfc::Status::InvalidArgument, "label");
    p.labels[N - 1] = static_cast<std::int64_t>(((N - 1) * 7 + 3) % C);
    CHECK(all_centers(head) == before);
    bool grad_untouched = true;
    for (float x : grad) grad_untouched = grad_untouched && x == 7.0f;
    CHECK(grad_untouched);

    // NaN embeddings.
    const float saved = p.emb[5];
    p.emb[5] = std::nanf("");
    EXPECT_ERROR(head.train_step(batches), pfc::Status::InvalidArgument, "NaN");
    p.emb[5] = saved;

    // NULL / empty input: an empty span is passed as NULL and the library names it.
    std::vector<pfc::Batch> no_emb{pfc::Batch(pfc::span<const float>(), l.subspan(0, rows0), g.subspan(0, rows0 * D)),
                                   batches[1]};
    EXPECT_ERROR(head.train_step(no_emb), pfc::Status::NullArgument, "embeddings");
    std::vector<pfc::Batch> no_grad{pfc::Batch(e.subspan(0, rows0 * D), l.subspan(0, rows0)), batches[1]};
    EXPECT_ERROR(head.train_step(no_grad), pfc::Status::NullArgument, "grad_embeddings");
    head.evaluate(no_grad);  // evaluate needs no gradient buffer
    EXPECT_ERROR(head.train_step(nullptr, 2), pfc::Status::NullArgument, "batches");
    EXPECT_ERROR(head.train_step(pfc::span<const pfc::Batch>()), pfc::Status::InvalidArgument, "batches");
    std::vector<pfc::Batch> empty{pfc::Batch(), pfc::Batch()};
    EXPECT_ERROR(head.train_step(empty), pfc::Status::InvalidArgument, "empty");
    // One empty shard is fine.
    std::vector<pfc::Batch> lopsided{pfc::Batch(e, l, g), pfc::Batch()};
    CHECK(head.train_step(lopsided).global_batch == N);
    CHECK(head.train_step({pfc::Batch(e, l, g), pfc::Batch()}).global_batch == N);  // an initializer list
    CHECK(head.evaluate({batches[0], batches[1]}).global_batch == N);
    // Sizes the wrapper checks itself: too few embedding values, a short gradient.
    std::vector<pfc::Batch> short_emb{pfc::Batch(e.subspan(0, rows0 * D - 1), l.subspan(0, rows0), g.subspan(0, rows0 * D)),
                                      batches[1]};
    EXPECT_ERROR(head.train_step(short_emb), pfc::Status::InvalidArgument, "embeddings hold");
    std::vector<pfc::Batch> short_grad{pfc::Batch(e.subspan(0, rows0 * D), l.subspan(0, rows0), g.subspan(0, D)), batches[1]};
    EXPECT_ERROR(head.train_step(short_grad), pfc::Status::InvalidArgument, "grad holds");
    // A batch count other than local_shards.
    EXPECT_ERROR(head.train_step(batches[0]), pfc::Status::InvalidArgument, "batches");
    // Unknown dtype and device memory through the raw overload.
    pfc_batch raw[2] = {batches[0].to_c(D, true, 0, "test"), batches[1].to_c(D, true, 1, "test")};
    raw[1].dtype = 9;
    EXPECT_ERROR(head.train_step(raw, 2), pfc::Status::InvalidArgument, "dtype");
    raw[1].dtype = PFC_DTYPE_F32;
    raw[0].memory = PFC_MEMORY_DEVICE;
    EXPECT_ERROR(head.train_step(raw, 2), pfc::Status::InvalidArgument, "device");
    raw[0].memory = PFC_MEMORY_HOST;
    head.evaluate(raw, 2);

    // Learning rate.
    EXPECT_ERROR(head.set_learning_rate(std::nanf("")), pfc::Status::InvalidArgument, "learning rate");
    EXPECT_ERROR(head.set_learning_rate(-1.0f), pfc::Status::InvalidArgument, "learning rate");
    head.set_learning_rate(0.0f);
    const std::vector<float> frozen = all_centers(head);
    head.train_step(batches);
    CHECK(all_centers(head) == frozen);

    // Centers: ranges, normalization, NULL and range errors.
    EXPECT_ERROR(head.centers(C - 1, 2), pfc::Status::InvalidArgument, "class");
    EXPECT_ERROR(head.centers(0, 0), pfc::Status::InvalidArgument, "count");
    EXPECT_ERROR(head.centers(0, C + 1), pfc::Status::InvalidArgument, "count");
    std::vector<float> part(3 * D);
    head.get_centers(5, part, true);
    double n2 = 0.0;
    for (std::size_t j = 0; j < D; j++) n2 += static_cast<double>(part[j]) * part[j];
    CHECK(std::fabs(n2 - 1.0) < 1e-5);
    std::vector<float> odd(D + 1);
    EXPECT_ERROR(head.get_centers(0, odd), pfc::Status::InvalidArgument, "dimension");
    EXPECT_ERROR(head.get_centers(0, pfc::span<float>()), pfc::Status::NullArgument, "out");
    EXPECT_ERROR(head.set_centers(0, pfc::span<const float>()), pfc::Status::NullArgument, "in");
    std::vector<float> inf_rows(2 * D, 1.0f);
    inf_rows[D + 1] = INFINITY;
    EXPECT_ERROR(head.set_centers(0, inf_rows), pfc::Status::InvalidArgument, "NaN");
    EXPECT_ERROR(head.set_centers(C - 1, std::vector<float>(2 * D, 1.0f)), pfc::Status::InvalidArgument, "class");
    CHECK(all_centers(head) == frozen);
}

static void test_search(const Problem& p) {
    pfc::Head head(base_config(2));
    head.set_centers(0, p.prototypes);  // warm start: the prototypes are the centers
    CHECK(all_centers(head) == p.prototypes);

    const std::size_t q = 10;
    std::vector<float> queries(p.emb.begin(), p.emb.begin() + q * D);
    const pfc::SearchResult r = head.search(queries, 5);
    CHECK(r.queries == q && r.k == 5 && r.ids.size() == q * 5 && r.scores.size() == q * 5);
    unsigned right = 0;
    for (std::size_t i = 0; i < q; i++) {
        right += r.id(i, 0) == p.labels[i];
        for (std::size_t j = 1; j < 5; j++) CHECK(r.score(i, j - 1) >= r.score(i, j));
        CHECK(r.score(i, 0) <= 1.0001f && r.score(i, 0) > 0.5f);
    }
    CHECK(right >= 9);

    // Into caller buffers; the same answer.
    std::vector<std::int64_t> ids(q * 5);
    std::vector<float> scores(q * 5);
    head.search(queries, 5, ids, scores);
    CHECK(ids == r.ids && scores == r.scores);

    EXPECT_ERROR(head.search(pfc::span<const float>(), 3), pfc::Status::NullArgument, "queries");
    EXPECT_ERROR(head.search(queries, 0), pfc::Status::InvalidArgument, "k");
    EXPECT_ERROR(head.search(queries, static_cast<std::uint32_t>(C + 1)), pfc::Status::InvalidArgument, "k");
    EXPECT_ERROR(head.search(pfc::span<const float>(queries.data(), D + 3), 3), pfc::Status::InvalidArgument, "dimension");
    EXPECT_ERROR(head.search(queries, 5, pfc::span<std::int64_t>(ids.data(), 3), scores), pfc::Status::InvalidArgument,
                 "entries");
    queries[7] = std::nanf("");
    EXPECT_ERROR(head.search(queries, 5), pfc::Status::InvalidArgument, "NaN");
}

static void test_checkpoint_and_export(const Problem& p, const fs::path& dir) {
    pfc::Config cfg = base_config(2);
    cfg.optimizer = pfc::Optimizer::AdamW;
    cfg.lr = 0.05f;
    pfc::Head head(cfg);
    std::vector<float> grad(N * D);
    const pfc::Batch whole(p.emb, p.labels, grad);
    const std::vector<float> half_emb(p.emb.begin(), p.emb.begin() + 20 * D);
    const pfc::Batch a(half_emb, pfc::span<const std::int64_t>(p.labels.data(), 20), pfc::span<float>(grad.data(), 20 * D));
    const pfc::Batch b(pfc::span<const float>(p.emb.data() + 20 * D, (N - 20) * D),
                       pfc::span<const std::int64_t>(p.labels.data() + 20, N - 20),
                       pfc::span<float>(grad.data() + 20 * D, (N - 20) * D));
    const std::vector<pfc::Batch> two{a, b};
    for (int t = 0; t < 3; t++) head.train_step(two);

    const fs::path ckpt = dir / "ckpt";
    head.save_checkpoint(ckpt.string());
    CHECK(fs::exists(ckpt / "manifest.json"));
    const std::vector<float> saved = all_centers(head);
    const pfc::StepStats after_save = head.train_step(two);
    CHECK(after_save.step == 4 && all_centers(head) != saved);

    // Load restores centers and the step counter; a one-shard head reads a two-shard checkpoint.
    head.load_checkpoint(ckpt.string());
    CHECK(all_centers(head) == saved);
    CHECK(head.evaluate(two).step == 3);
    pfc::Config one = cfg;
    one.local_shards = 1;
    pfc::Head resharded(one);
    resharded.load_checkpoint(ckpt.string());
    CHECK(all_centers(resharded) == saved);
    const pfc::StepStats s1 = resharded.train_step(whole);
    const pfc::StepStats s2 = head.train_step(two);
    CHECK(s1.step == 4 && s2.step == 4 && std::fabs(s1.loss - s2.loss) < 1e-4 * s2.loss);

    // Errors: missing directory, incompatible head, NUL in the path, empty path, corrupt files.
    EXPECT_ERROR(head.load_checkpoint((dir / "no-such-checkpoint").string()), pfc::Status::Io, "no-such-checkpoint");
    pfc::Config other = cfg;
    other.num_classes = C + 1;
    pfc::Head wrong(other);
    EXPECT_ERROR(wrong.load_checkpoint(ckpt.string()), pfc::Status::Incompatible, "classes");
    pfc::Head sgd(base_config(2));
    EXPECT_ERROR(sgd.load_checkpoint(ckpt.string()), pfc::Status::Incompatible, "optimizer");
    EXPECT_ERROR(head.load_checkpoint(std::string("a\0b", 3)), pfc::Status::InvalidArgument, "NUL");
    EXPECT_ERROR(head.load_checkpoint(""), pfc::Status::InvalidArgument, "empty");
    EXPECT_ERROR(head.save_checkpoint(""), pfc::Status::InvalidArgument, "empty");

    const std::vector<float> current = all_centers(head);
    fs::path shard;
    for (const auto& entry : fs::directory_iterator(ckpt)) {
        if (entry.path().extension() == ".safetensors") shard = entry.path();
    }
    CHECK(!shard.empty());
    const std::vector<char> original = read_file(shard);
    std::vector<char> altered = original;
    altered[altered.size() - 3] ^= 0x10;  // a bit of the last tensor
    write_file(shard, altered);
    // Found by the checksum or by a check of the values read first; either way the file is named.
    EXPECT_ERROR(head.load_checkpoint(ckpt.string()), pfc::Status::Corrupt, shard.filename().string().c_str());
    altered.resize(original.size() / 2);  // truncated
    write_file(shard, altered);
    EXPECT_ERROR(head.load_checkpoint(ckpt.string()), pfc::Status::Corrupt, "truncated");
    write_file(shard, original);
    const std::vector<char> manifest = read_file(ckpt / "manifest.json");
    std::vector<char> bad_manifest = manifest;
    bad_manifest[10] = bad_manifest[10] == 'x' ? 'y' : 'x';
    write_file(ckpt / "manifest.json", bad_manifest);
    EXPECT_ERROR(head.load_checkpoint(ckpt.string()), pfc::Status::Corrupt, "manifest");
    CHECK(all_centers(head) == current);  // every failed load left the head as it was
    write_file(ckpt / "manifest.json", manifest);
    head.load_checkpoint(ckpt.string());
    CHECK(all_centers(head) == saved);

    // Export: .npy f32 normalized, safetensors f16; .fvecs refuses f16.
    const fs::path npy = dir / "centers.npy";
    head.export_centers(npy.string(), pfc::Format::Npy);
    const std::vector<char> bytes = read_file(npy);
    CHECK(bytes.size() > 128 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0);
    const std::size_t header = 10 + static_cast<unsigned char>(bytes[8]) + 256u * static_cast<unsigned char>(bytes[9]);
    CHECK(bytes.size() == header + C * D * sizeof(float));
    std::vector<float> unit(C * D);
    std::memcpy(unit.data(), bytes.data() + header, unit.size() * sizeof(float));
    CHECK(unit == head.centers(0, C, true));
    head.export_centers((dir / "centers.safetensors").string(), pfc::Format::Safetensors, pfc::DType::F16, false);
    CHECK(fs::file_size(dir / "centers.safetensors") > C * D * 2);
    EXPECT_ERROR(head.export_centers((dir / "c.fvecs").string(), pfc::Format::Fvecs, pfc::DType::F16),
                 pfc::Status::InvalidArgument, "fvecs");
    EXPECT_ERROR(head.export_centers((dir / "c.bin").string(), static_cast<pfc::Format>(9)), pfc::Status::InvalidArgument,
                 "format");
    EXPECT_ERROR(head.export_centers((dir / "missing-dir" / "c.npy").string(), pfc::Format::Npy), pfc::Status::Io, "");
    CHECK(!fs::exists(dir / "c.fvecs"));
}

// IEEE binary16, round to nearest even (normal range only; enough for these embeddings).
static pfc::f16 to_f16(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const int e = static_cast<int>((x >> 23) & 0xffu) - 127 + 15;
    if (e <= 0) return pfc::f16{static_cast<std::uint16_t>(sign)};
    std::uint32_t h = (static_cast<std::uint32_t>(e) << 10) | ((x & 0x7fffffu) >> 13);
    const std::uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return pfc::f16{static_cast<std::uint16_t>(sign | h)};
}

static void test_half(const Problem& p) {
    pfc::Head head(base_config(1));
    std::vector<pfc::f16> emb(p.emb.size()), grad(p.emb.size());
    for (std::size_t i = 0; i < emb.size(); i++) emb[i] = to_f16(p.emb[i]);
    const pfc::Batch b(emb, p.labels, grad);
    CHECK(b.dtype() == pfc::DType::F16);
    const double first = head.train_step(b).loss;
    double last = first;
    for (int t = 0; t < 6; t++) last = head.train_step(b).loss;
    CHECK(std::isfinite(first) && last < first);
    bool nonzero = false;
    for (const pfc::f16& g : grad) nonzero = nonzero || (g.bits & 0x7fffu) != 0;
    CHECK(nonzero);
    std::vector<pfc::bf16> bemb(p.emb.size());
    for (std::size_t i = 0; i < bemb.size(); i++) {
        std::uint32_t x;
        std::memcpy(&x, &p.emb[i], sizeof x);
        bemb[i].bits = static_cast<std::uint16_t>(x >> 16);
    }
    CHECK(std::isfinite(head.evaluate(pfc::Batch(bemb, p.labels)).loss));
}

static std::uint32_t bits_of(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    return x;
}

// `f` rounded to the nearest bf16 (ties to even), widened back to float (finite values only).
static float bf16_nearest(float f) {
    std::uint32_t x = bits_of(f);
    x = ((x + 0x7fffu + ((x >> 16) & 1u)) >> 16) << 16;
    float r;
    std::memcpy(&r, &x, sizeof r);
    return r;
}

static bool all_bf16(const std::vector<float>& v) {
    for (float x : v) {
        if ((bits_of(x) & 0xffffu) != 0) return false;
    }
    return true;
}

// A head storing bf16: trains, its centers are bf16 values, set_centers rounds to nearest, its
// checkpoint loads into bf16 and f32 heads of another shard count, and it exports bf16.
static void test_bf16_storage(const Problem& p, const fs::path& dir) {
    pfc::Config cfg = base_config(2);
    cfg.storage_dtype = pfc::DType::BF16;
    pfc::Head head(cfg);
    std::vector<float> grad(N * D);
    const pfc::Batch whole(p.emb, p.labels, grad);
    const std::vector<pfc::Batch> two{pfc::Batch(pfc::span<const float>(p.emb.data(), 20 * D), pfc::span<const std::int64_t>(p.labels.data(), 20),
                                                 pfc::span<float>(grad.data(), 20 * D)),
                                      pfc::Batch(pfc::span<const float>(p.emb.data() + 20 * D, (N - 20) * D),
                                                 pfc::span<const std::int64_t>(p.labels.data() + 20, N - 20),
                                                 pfc::span<float>(grad.data() + 20 * D, (N - 20) * D))};
    const std::vector<float> initial = all_centers(head);
    const double first = head.train_step(two).loss;
    double last = first;
    for (int t = 0; t < 5; t++) last = head.train_step(two).loss;
    const std::vector<float> trained = all_centers(head);
    CHECK(std::isfinite(first) && last < first && trained != initial && all_bf16(trained));

    // set_centers keeps the nearest bf16 of each value; get_centers gives them back exactly.
    std::vector<float> values(3 * D);
    for (std::size_t i = 0; i < values.size(); i++) values[i] = 0.1f + 1.0e-3f * static_cast<float>(i);
    head.set_centers(5, values);
    const std::vector<float> got = head.centers(5, 3);
    bool nearest = true, rounded = false;
    for (std::size_t i = 0; i < values.size(); i++) {
        nearest = nearest && got[i] == bf16_nearest(values[i]);
        rounded = rounded || got[i] != values[i];
    }
    CHECK(nearest && rounded);

    const fs::path ckpt = dir / "ckpt-bf16";
    head.save_checkpoint(ckpt.string());
    const std::vector<float> saved = all_centers(head);
    pfc::Config one = cfg;
    one.local_shards = 1;
    pfc::Head bf16_one(one);
    bf16_one.load_checkpoint(ckpt.string());
    CHECK(all_centers(bf16_one) == saved);
    one.storage_dtype = pfc::DType::F32;
    pfc::Head f32_one(one);
    f32_one.load_checkpoint(ckpt.string());
    CHECK(all_centers(f32_one) == saved);
    CHECK(bf16_one.train_step(whole).step == 7 && all_bf16(all_centers(bf16_one)));

    // A bf16 safetensors export holds the stored bits: 2 bytes a value after the header.
    const fs::path st = dir / "centers-bf16.safetensors";
    head.export_centers(st.string(), pfc::Format::Safetensors, pfc::DType::BF16, false);
    const std::vector<char> bytes = read_file(st);
    std::uint64_t header = 0;
    std::memcpy(&header, bytes.data(), sizeof header);
    CHECK(bytes.size() == 8 + header + C * D * 2);
    const std::string json(bytes.data() + 8, header);
    CHECK(json.find("\"BF16\"") != std::string::npos);
    bool stored_bits = true;
    for (std::size_t i = 0; i < C * D; i++) {
        std::uint16_t b;
        std::memcpy(&b, bytes.data() + 8 + header + 2 * i, sizeof b);
        stored_bits = stored_bits && b == static_cast<std::uint16_t>(bits_of(saved[i]) >> 16);
    }
    CHECK(stored_bits);
    EXPECT_ERROR(head.export_centers((dir / "c-bf16.npy").string(), pfc::Format::Npy, pfc::DType::BF16),
                 pfc::Status::InvalidArgument, "numpy");
    pfc::Config f16 = cfg;
    f16.storage_dtype = pfc::DType::F16;
    EXPECT_ERROR(pfc::Head{f16}, pfc::Status::InvalidArgument, "storage_dtype");
}

// Moved-from and reset heads: no double free, calls throw PFC_ERR_NULL_ARGUMENT naming the head.
static void test_lifetime(const Problem& p) {
    pfc::Head a(base_config(1));
    std::vector<float> grad(N * D);
    const pfc::Batch batch(p.emb, p.labels, grad);
    a.train_step(batch);
    pfc_head* const raw = a.get();

    pfc::Head b(std::move(a));
    CHECK(!a && a.get() == nullptr && b.get() == raw);
    CHECK(b.train_step(batch).step == 2);
    EXPECT_ERROR(a.train_step(batch), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(a.evaluate(batch), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(a.centers(0, 1), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(a.search(p.prototypes, 2), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(a.local_classes(), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(a.save_checkpoint("x"), pfc::Status::NullArgument, "head");

    pfc::Head c(base_config(1));
    c = std::move(b);  // frees c's own head, takes b's
    CHECK(c.get() == raw && !b);
    c = std::move(c);  // self-move keeps it
    CHECK(c.get() == raw);
    CHECK(c.train_step(batch).step == 3);

    c.reset();
    c.reset();  // twice: a no-op
    CHECK(!c);
    EXPECT_ERROR(c.train_step(batch), pfc::Status::NullArgument, "head");
    EXPECT_ERROR(c.set_learning_rate(0.1f), pfc::Status::NullArgument, "head");

    pfc::Head d(base_config(1));
    pfc_head* released = d.release();
    CHECK(released != nullptr && !d);
    pfc_destroy(released);
}

int main(int argc, char** argv) {
    const fs::path dir = argc > 1 ? fs::path(argv[1]) : fs::temp_directory_path() / "pfc_binding_test";
    fs::create_directories(dir);
    Problem p = make_problem();
    try {
        test_types_and_config();
        test_create_errors();
        test_training_and_errors(p);
        test_adaface(p);
        test_search(p);
        test_checkpoint_and_export(p, dir);
        test_half(p);
        test_bf16_storage(p, dir);
        test_lifetime(p);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "c++ binding: FAILED: unexpected exception: %s\n", e.what());
        return 1;
    }
    std::printf("c++ binding (C++%ld): %u checks passed\n", static_cast<long>(__cplusplus / 100 % 100), checks_passed);
    return 0;
}
