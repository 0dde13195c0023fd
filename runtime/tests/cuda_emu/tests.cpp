// Checks of the CUDA kernels' logic against plain reference loops, run on
// the CPU through emu.h. Built and run by tests/cuda_kernels_emulated.rs,
// which prepends emu.h, common.cuh and every kernels/*.cu. Prints one line
// per check and exits non-zero on the first failure.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>

static std::mt19937 rng(1234);
static float randn() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }

static bf16 to_bf16(float f) {
    unsigned b = __float_as_uint(f);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (bf16)(b >> 16);
}
static float from_bf16(bf16 h) { return __uint_as_float(((unsigned)h) << 16); }

static int failures = 0;
static void check(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) failures++;
}
static bool close(float got, double want, double rel, double abs_tol) {
    return std::fabs(got - want) <= abs_tol + rel * std::fabs(want);
}

static void test_embedding() {
    const int vocab = 11, hidden = 70;
    std::vector<bf16> table(vocab * hidden);
    for (auto& v : table) v = to_bf16(randn());
    std::vector<u32> ids = {3, 0, 10, 3};
    std::vector<float> out(ids.size() * hidden);
    emu_launch({(unsigned)ids.size()}, 64, [&] { embedding_gather(table.data(), ids.data(), out.data(), hidden); });
    bool ok = true;
    for (size_t t = 0; t < ids.size(); ++t)
        for (int i = 0; i < hidden; ++i) ok &= out[t * hidden + i] == from_bf16(table[ids[t] * hidden + i]);
    check(ok, "embedding_gather copies the rows of the ids");
}

static void test_rms_norm() {
    const int n = 3, hidden = 300;
    const float eps = 1e-5f;
    std::vector<float> x(n * hidden), w(hidden);
    for (auto& v : x) v = randn() * 3;
    for (auto& v : w) v = randn();
    std::vector<bf16> out(n * hidden);
    emu_launch({n}, 96, [&] { rms_norm(x.data(), w.data(), out.data(), hidden, eps); });
    bool ok = true;
    for (int r = 0; r < n; ++r) {
        double ss = 0;
        for (int i = 0; i < hidden; ++i) ss += (double)x[r * hidden + i] * x[r * hidden + i];
        const double scale = 1.0 / std::sqrt(ss / hidden + eps);
        for (int i = 0; i < hidden; ++i)
            ok &= close(from_bf16(out[r * hidden + i]), x[r * hidden + i] * scale * w[i], 8e-3, 1e-6);
    }
    check(ok, "rms_norm matches x / rms(x) * w within bf16 rounding");
}

static void test_rope(bool adjacent) {
    const int n_heads = 3, hd = 8, half = hd / 2;
    std::vector<u32> pos = {0, 5, 1000};
    std::vector<float> freqs(half);
    for (int i = 0; i < half; ++i) freqs[i] = (float)std::pow(10000.0, -2.0 * i / hd);
    std::vector<float> x(pos.size() * n_heads * hd);
    for (auto& v : x) v = randn();
    std::vector<float> want = x;
    for (size_t t = 0; t < pos.size(); ++t)
        for (int h = 0; h < n_heads; ++h)
            for (int i = 0; i < half; ++i) {
                float* head = want.data() + (t * n_heads + h) * hd;
                const int a = adjacent ? 2 * i : i, b = adjacent ? 2 * i + 1 : i + half;
                const double ang = (double)pos[t] * freqs[i];
                const float c = (float)std::cos(ang), s = (float)std::sin(ang);
                const float x0 = head[a], x1 = head[b];
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
    emu_launch({(unsigned)pos.size()}, 32, [&] {
        if (adjacent) rope_adjacent(x.data(), pos.data(), freqs.data(), n_heads, hd);
        else rope_halves(x.data(), pos.data(), freqs.data(), n_heads, hd);
    });
    bool ok = true;
    for (size_t i = 0; i < x.size(); ++i) ok &= close(x[i], want[i], 1e-5, 1e-6);
    check(ok, adjacent ? "rope_adjacent rotates pairs (2i, 2i+1)" : "rope_halves rotates pairs (i, i+d/2)");
}

static void test_swiglu() {
    const int n = 2, ffn = 37;
    std::vector<float> gu(n * 2 * ffn);
    for (auto& v : gu) v = randn() * 2;
    std::vector<bf16> out(n * ffn);
    const int total = n * ffn;
    emu_launch({(unsigned)((total + 63) / 64)}, 64, [&] { swiglu(gu.data(), gu.data() + ffn, 2 * ffn, out.data(), n, ffn); });
    bool ok = true;
    for (int t = 0; t < n; ++t)
        for (int i = 0; i < ffn; ++i) {
            const double g = gu[t * 2 * ffn + i], u = gu[t * 2 * ffn + ffn + i];
            ok &= close(from_bf16(out[t * ffn + i]), g / (1 + std::exp(-g)) * u, 8e-3, 1e-6);
        }
    check(ok, "swiglu over a fused gate|up row");
}

// A paged KV cache of one layer filled through kv_write.
struct Cache {
    int n_kv_heads, hd, block_size, num_blocks, max_blocks;
    std::vector<bf16> k, v;
    std::vector<u32> tables;  // [n_seqs, max_blocks]
    int kv_dim() const { return n_kv_heads * hd; }
    u64 slot(int s, int pos) const { return (u64)tables[s * max_blocks + pos / block_size] * block_size + pos % block_size; }
    float key(int s, int pos, int kvh, int d) const { return from_bf16(k[slot(s, pos) * kv_dim() + kvh * hd + d]); }
    float val(int s, int pos, int kvh, int d) const { return from_bf16(v[slot(s, pos) * kv_dim() + kvh * hd + d]); }
};

// Allocates shuffled blocks for sequences of `lens` positions and writes
// random K/V for all of them with kv_write.
static Cache make_cache(int n_kv_heads, int hd, int block_size, const std::vector<int>& lens) {
    Cache c{n_kv_heads, hd, block_size, 0, 0, {}, {}, {}};
    int total_blocks = 0;
    for (int l : lens) { c.max_blocks = std::max(c.max_blocks, (l + block_size - 1) / block_size); total_blocks += (l + block_size - 1) / block_size; }
    c.num_blocks = total_blocks + 3;
    std::vector<u32> ids(c.num_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    c.tables.assign(lens.size() * c.max_blocks, 0);
    int next = 0;
    for (size_t s = 0; s < lens.size(); ++s)
        for (int b = 0; b < (lens[s] + block_size - 1) / block_size; ++b) c.tables[s * c.max_blocks + b] = ids[next++];
    c.k.assign((size_t)c.num_blocks * block_size * c.kv_dim(), 0);
    c.v = c.k;
    std::vector<float> kf, vf;
    std::vector<u32> slots;
    for (size_t s = 0; s < lens.size(); ++s)
        for (int p = 0; p < lens[s]; ++p) {
            slots.push_back((u32)c.slot((int)s, p));
            for (int i = 0; i < c.kv_dim(); ++i) { kf.push_back(randn()); vf.push_back(randn()); }
        }
    const int kv_dim = c.kv_dim();
    emu_launch({(unsigned)slots.size()}, 32, [&] { kv_write(kf.data(), vf.data(), c.k.data(), c.v.data(), slots.data(), kv_dim); });
    // kv_write's own check: the written slots hold the rounded inputs.
    bool ok = true;
    for (size_t t = 0; t < slots.size(); ++t)
        for (int i = 0; i < kv_dim; ++i)
            ok &= c.k[slots[t] * kv_dim + i] == to_bf16(kf[t * kv_dim + i]) && c.v[slots[t] * kv_dim + i] == to_bf16(vf[t * kv_dim + i]);
    check(ok, "kv_write stores bf16 K/V at block * block_size + offset");
    return c;
}

// softmax(scale q.k_j) v_j over keys 0..n_keys of sequence s, in double.
static std::vector<double> attend_ref(const Cache& c, int s, int kvh, const float* q, int n_keys, float scale) {
    std::vector<double> sc(n_keys), out(c.hd, 0.0);
    double m = -1e300;
    for (int j = 0; j < n_keys; ++j) {
        double d = 0;
        for (int i = 0; i < c.hd; ++i) d += (double)q[i] * c.key(s, j, kvh, i);
        sc[j] = d * scale;
        m = std::max(m, sc[j]);
    }
    double z = 0;
    for (int j = 0; j < n_keys; ++j) { sc[j] = std::exp(sc[j] - m); z += sc[j]; }
    for (int j = 0; j < n_keys; ++j)
        for (int i = 0; i < c.hd; ++i) out[i] += sc[j] / z * c.val(s, j, kvh, i);
    return out;
}

static void test_decode(int n_heads, int n_kv_heads, int hd, std::vector<int> lens) {
    const int bs = 16;
    Cache c = make_cache(n_kv_heads, hd, bs, lens);
    const int n_seqs = (int)lens.size(), group = n_heads / n_kv_heads;
    const float scale = 1.0f / std::sqrt((float)hd);
    std::vector<float> q(n_seqs * n_heads * hd);
    for (auto& v : q) v = randn();
    std::vector<u32> ctx(lens.begin(), lens.end());
    std::vector<bf16> out(q.size());
    emu_launch({(unsigned)n_heads, (unsigned)n_seqs}, 128, [&] {
        paged_attention_decode(out.data(), q.data(), c.k.data(), c.v.data(), c.tables.data(), ctx.data(), c.max_blocks,
                               n_heads, n_kv_heads, hd, bs, scale);
    });
    bool ok = true;
    double worst = 0;
    for (int s = 0; s < n_seqs; ++s)
        for (int h = 0; h < n_heads; ++h) {
            auto want = attend_ref(c, s, h / group, q.data() + (s * n_heads + h) * hd, lens[s], scale);
            for (int i = 0; i < hd; ++i) {
                const float got = from_bf16(out[(s * n_heads + h) * hd + i]);
                ok &= close(got, want[i], 1e-2, 2e-3);
                worst = std::max(worst, std::fabs(got - want[i]));
            }
        }
    char what[160];
    std::snprintf(what, sizeof what, "paged_attention_decode heads %d/%d head_dim %d (max |err| %.2g)", n_heads, n_kv_heads, hd, worst);
    check(ok, what);
}

// seqs: (cached prefix length, new tokens).
static void test_prefill(int n_heads, int n_kv_heads, int hd, std::vector<std::pair<int, int>> seqs) {
    const int bs = 16;
    std::vector<int> lens;
    for (auto [start, n] : seqs) lens.push_back(start + n);
    Cache c = make_cache(n_kv_heads, hd, bs, lens);
    const int n_seqs = (int)seqs.size(), group = n_heads / n_kv_heads, q_dim = n_heads * hd;
    const float scale = 1.0f / std::sqrt((float)hd);
    std::vector<u32> qstart = {0}, start;
    int max_new = 0;
    for (auto [st, n] : seqs) { qstart.push_back(qstart.back() + n); start.push_back(st); max_new = std::max(max_new, n); }
    const int n_tokens = (int)qstart.back();
    std::vector<float> q(n_tokens * q_dim);
    for (auto& v : q) v = randn();
    std::vector<bf16> out(q.size(), 0);
    const unsigned gx = (max_new * group + 15) / 16;
    emu_launch({gx, (unsigned)n_kv_heads, (unsigned)n_seqs}, 128, [&] {
        prefill_attention(out.data(), q.data(), c.k.data(), c.v.data(), c.tables.data(), qstart.data(), start.data(),
                          c.max_blocks, n_heads, n_kv_heads, hd, bs, scale);
    });
    bool ok = true;
    double worst = 0;
    for (int s = 0; s < n_seqs; ++s)
        for (int i = 0; i < seqs[s].second; ++i)
            for (int h = 0; h < n_heads; ++h) {
                const int row = qstart[s] + i;
                auto want = attend_ref(c, s, h / group, q.data() + row * q_dim + h * hd, seqs[s].first + i + 1, scale);
                for (int d = 0; d < hd; ++d) {
                    const float got = from_bf16(out[row * q_dim + h * hd + d]);
                    ok &= close(got, want[d], 1e-2, 2e-3);
                    worst = std::max(worst, std::fabs(got - want[d]));
                }
            }
    char what[160];
    std::snprintf(what, sizeof what, "prefill_attention heads %d/%d head_dim %d, causal after a cached prefix (max |err| %.2g)", n_heads,
                  n_kv_heads, hd, worst);
    check(ok, what);
}

static void test_argmax() {
    const int vocab = 1000;
    std::vector<float> l(2 * vocab);
    for (int i = 0; i < vocab; ++i) l[i] = randn();
    l[17] = 50.0f;
    l[900] = 50.0f;
    for (int i = 0; i < vocab; ++i) l[vocab + i] = -1.0f;
    std::vector<u32> out(2, 12345);
    emu_launch({2}, 256, [&] { argmax(l.data(), vocab, out.data()); });
    check(out[0] == 17 && out[1] == 0, "argmax takes the lowest index among equal maxima");
}

// What sample_top_k_top_p should draw, computed the plain way (sorting).
static u32 sample_ref(const std::vector<float>& l, float t, u32 k, float p, float u) {
    const int vocab = (int)l.size();
    std::vector<float> sorted = l;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    const float mx = sorted[0];
    float thr = (k > 0 && (int)k < vocab) ? sorted[k - 1] : -INFINITY;
    if (p < 1.0f) {
        double z = 0;
        for (float v : sorted) if (v >= thr) z += std::exp((v - mx) / t);
        double cum = 0;
        for (float v : sorted) {
            if (v < thr) break;
            cum += std::exp((v - mx) / t);
            if (cum >= p * z) { thr = std::max(thr, v); break; }
        }
    }
    double m = 0;
    for (float v : l) if (v >= thr) m += std::exp((v - mx) / t);
    const double r = u * m;
    double cum = 0;
    for (int i = 0; i < vocab; ++i) {
        if (l[i] < thr) continue;
        cum += std::exp((l[i] - mx) / t);
        if (r < cum) return i;
    }
    return 0xffffffffu;
}

static void test_sampling() {
    const int vocab = 300;
    struct Case { float t; u32 k; float p; float u; };
    std::vector<Case> cases = {
        {1.0f, 1, 1.0f, 0.99f}, {1.0f, 0, 1e-6f, 0.5f}, {0.7f, 5, 1.0f, 0.0f}, {0.7f, 5, 1.0f, 0.3f},
        {0.7f, 5, 1.0f, 0.77f}, {0.7f, 5, 1.0f, 0.999f}, {1.3f, 0, 0.5f, 0.1f}, {1.3f, 0, 0.5f, 0.6f},
        {1.3f, 0, 0.5f, 0.95f}, {1.0f, 10, 0.8f, 0.42f}, {2.0f, 0, 1.0f, 0.5f}, {2.0f, 299, 0.9f, 0.25f},
    };
    const int n = (int)cases.size();
    std::vector<float> logits(n * vocab);
    for (auto& v : logits) v = randn() * 2;
    std::vector<float> t, p, u;
    std::vector<u32> k, out(n, 0xdeadu);
    for (auto& c : cases) { t.push_back(c.t); k.push_back(c.k); p.push_back(c.p); u.push_back(c.u); }
    emu_launch({(unsigned)n}, 128, [&] {
        sample_top_k_top_p(logits.data(), vocab, t.data(), k.data(), p.data(), u.data(), out.data());
    });
    for (int i = 0; i < n; ++i) {
        std::vector<float> row(logits.begin() + i * vocab, logits.begin() + (i + 1) * vocab);
        const u32 want = sample_ref(row, cases[i].t, cases[i].k, cases[i].p, cases[i].u);
        char what[160];
        std::snprintf(what, sizeof what, "sample_top_k_top_p T=%.1f k=%u p=%g u=%.3f draws %u (reference %u)", cases[i].t, cases[i].k,
                      cases[i].p, cases[i].u, out[i], want);
        check(out[i] == want, what);
    }
}

int main() {
    test_embedding();
    test_rms_norm();
    test_rope(true);
    test_rope(false);
    test_swiglu();
    test_decode(9, 3, 64, {1, 37, 600});   // SmolLM2's heads; 600 > one 512-key tile
    test_decode(2, 1, 32, {50});           // head_dim < 128: 4 interleaved key subsets
    test_decode(4, 2, 256, {70});          // head_dim > 128: two dims per thread
    test_prefill(9, 3, 64, {{0, 20}, {45, 7}, {3, 1}});
    test_prefill(4, 2, 128, {{17, 33}});
    test_argmax();
    test_sampling();
    std::printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
