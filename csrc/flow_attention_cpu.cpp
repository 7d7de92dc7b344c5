// Flow attention on the CPU: streaming softmax over key tiles (memory O(N), no N x N buffer),
// group rules, pair masks, attention mass, and the backward with dmass / dlse folded into
// delta, exactly the math of ditflow/reference.py (its flow_attention_reference_backward
// states the backward). Tile products go through ATen's GEMM (MKL / OpenBLAS)
// and exponentials through ATen's vectorised exp; rules are applied per run of keys of one group
// as three scalars (only pair masks are looked up per element). Work is split with
// at::parallel_for (OpenMP) over batch x heads x query tiles (forward, dq) or key tiles (dk, dv),
// so no two threads write the same rows.
//
// Registered as ditflow_cpp::flow_attention_fwd / flow_attention_bwd (CPU kernels), called by
// ditflow.ops when the extension is built (DITFLOW_BUILD_EXT=1).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlockM = 64;  // query rows per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Everything but q/k/v that shapes the computation, as raw fp32 / int32 pointers.
struct Layout {
  int64_t batch, heads, nq, nk, dim, groups;
  int64_t block_n;  // keys per tile
  float tau;
  const int32_t* q_groups = nullptr;  // [Pq, Nq]
  const int32_t* k_groups = nullptr;  // [Pk, Nk]
  int64_t q_groups_stride = 0, k_groups_stride = 0;
  const float* scale = nullptr;  // [1 or H, G, G] each, with its own head stride
  const float* bias = nullptr;
  const float* weight = nullptr;
  int64_t scale_hs = 0, bias_hs = 0, weight_hs = 0;
  const int32_t* bits = nullptr;  // [Pm, Nq, W]
  int64_t bits_batch_stride = 0, bits_row_stride = 0;
  std::vector<uint32_t> reach;  // per query group: key groups some head does not block

  int32_t qg(int64_t b, int64_t i) const { return q_groups ? q_groups[b * q_groups_stride + i] : 0; }
  int32_t kg(int64_t b, int64_t j) const { return k_groups ? k_groups[b * k_groups_stride + j] : 0; }
  bool pair_blocked(int64_t b, int64_t i, int64_t j) const {
    if (!bits) return false;
    const int32_t word = bits[b * bits_batch_stride + i * bits_row_stride + (j >> 5)];
    return (word >> (j & 31)) & 1;
  }
  // A tile is skipped when every (query group, key group) pair in it is blocked for all heads.
  bool tile_blocked(int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (!bias) return false;
    uint32_t qmask = 0, kmask = 0;
    for (int64_t i = i0; i < i1; ++i) qmask |= 1u << qg(b, i);
    for (int64_t j = j0; j < j1; ++j) kmask |= 1u << kg(b, j);
    for (int64_t a = 0; a < groups; ++a)
      if (((qmask >> a) & 1) && (reach[a] & kmask)) return false;
    return true;
  }
};

const float* table_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

int64_t head_stride(const c10::optional<at::Tensor>& t, int64_t groups) {
  return t.has_value() && t->size(0) > 1 ? groups * groups : 0;
}

// Wide key tiles: each tile has a fixed cost of a few ATen calls, and rules go by key runs, so a
// tile across group boundaries costs nothing extra. Narrower only when the dk/dv pass (one task
// per key tile) would have too few tasks to keep every thread busy.
int64_t keys_per_tile(int64_t batch_heads, int64_t nk) {
  int64_t n = 1024;
  while (n > 128 && batch_heads * ((nk + n - 1) / n) < 4 * at::get_num_threads()) n /= 2;
  return n;
}

// Group ids index the rule tables: refused outside [0, G) (ValueError in Python). flow_attention
// checks them eagerly, but not inside a torch.compile graph.
void check_group_ids(const char* name, const at::Tensor& groups, int64_t num_groups) {
  if (groups.numel() == 0) return;
  const auto [low_t, high_t] = at::aminmax(groups);
  const int64_t low = low_t.item<int64_t>(), high = high_t.item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < num_groups, name, ": group ids span [", low, ", ", high,
                    "] but the rules have ", num_groups, " groups (ids must be in [0, ",
                    num_groups, "))");
}

Layout make_layout(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& q_groups,
                   const c10::optional<at::Tensor>& k_groups, const c10::optional<at::Tensor>& scale,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& pair_bits, double softmax_scale, int64_t num_groups) {
  Layout L;
  L.batch = q.size(0);
  L.nq = q.size(1);
  L.heads = q.size(2);
  L.dim = q.size(3);
  L.nk = k.size(1);
  L.groups = num_groups;
  L.tau = static_cast<float>(softmax_scale);
  L.block_n = keys_per_tile(L.batch * L.heads, L.nk);
  if (q_groups.has_value()) {
    check_group_ids("q_groups", *q_groups, num_groups);
    check_group_ids("k_groups", *k_groups, num_groups);
    L.q_groups = q_groups->data_ptr<int32_t>();
    L.q_groups_stride = q_groups->size(0) == 1 ? 0 : q_groups->stride(0);
    L.k_groups = k_groups->data_ptr<int32_t>();
    L.k_groups_stride = k_groups->size(0) == 1 ? 0 : k_groups->stride(0);
  }
  L.scale = table_ptr(scale);
  L.bias = table_ptr(bias);
  L.weight = table_ptr(weight);
  L.scale_hs = head_stride(scale, num_groups);
  L.bias_hs = head_stride(bias, num_groups);
  L.weight_hs = head_stride(weight, num_groups);
  if (pair_bits.has_value()) {
    L.bits = pair_bits->data_ptr<int32_t>();
    L.bits_batch_stride = pair_bits->size(0) == 1 ? 0 : pair_bits->stride(0);
    L.bits_row_stride = pair_bits->stride(1);
  }
  L.reach.assign(num_groups, 0);
  const int64_t bias_heads = bias.has_value() ? bias->size(0) : 1;
  for (int64_t a = 0; a < num_groups; ++a)
    for (int64_t c = 0; c < num_groups; ++c)
      for (int64_t h = 0; h < bias_heads; ++h) {
        const float bv = L.bias ? L.bias[h * num_groups * num_groups + a * num_groups + c] : 0.f;
        if (bv > kNegInf) L.reach[a] |= 1u << c;
      }
  return L;
}

// Rules are per (query group, key group): a tile's keys are cut into runs of one group, and each
// row applies its rules run by run as three scalars. Only pair masks need a look per element.
struct KeyRun {
  int64_t begin, end;  // columns of the tile
  int32_t group;
};

void key_runs(const Layout& L, int64_t b, int64_t j0, int64_t cols, std::vector<KeyRun>& runs) {
  runs.clear();
  for (int64_t c = 0; c < cols; ++c) {
    const int32_t g = L.kg(b, j0 + c);
    if (runs.empty() || runs.back().group != g)
      runs.push_back({c, c + 1, g});
    else
      runs.back().end = c + 1;
  }
}

struct PairRules {
  float scale = 1.f, bias = 0.f, weight = 1.f;
};

PairRules pair_rules(const Layout& L, int64_t h, int32_t query_group, int32_t key_group) {
  const int64_t pair = query_group * L.groups + key_group;
  PairRules p;
  if (L.scale) p.scale = L.scale[h * L.scale_hs + pair];
  if (L.bias) p.bias = L.bias[h * L.bias_hs + pair];
  if (L.weight) p.weight = L.weight[h * L.weight_hs + pair];
  return p;
}

// Rule-modified scores of one tile (row stride ld), in place: s = scale * tau * s_raw + bias,
// -inf where a pair is blocked.
void apply_rules(const Layout& L, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                 int64_t cols, const std::vector<KeyRun>& runs, float* s, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t a = L.qg(b, i0 + r);
    float* srow = s + r * ld;
    for (const KeyRun& run : runs) {
      const PairRules p = pair_rules(L, h, a, run.group);
      const float mul = L.tau * p.scale, add = p.bias;
      for (int64_t c = run.begin; c < run.end; ++c) srow[c] = srow[c] * mul + add;
    }
    if (L.bits)
      for (int64_t c = 0; c < cols; ++c)
        if (L.pair_blocked(b, i0 + r, j0 + c)) srow[c] = kNegInf;
  }
}

// Inputs stay in their [B, N, H, D] layout (fp32 inputs are not copied); a head's rows are a
// strided [N, D] view that the GEMMs read directly. Detached: worker threads do not inherit the
// caller's no-grad mode.
at::Tensor as_float(const at::Tensor& x) {
  at::Tensor f = x.detach().to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

at::Tensor head(const at::Tensor& x, int64_t b, int64_t h) { return x[b].select(1, h); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_groups, const c10::optional<at::Tensor>& k_groups,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pair_bits,
    double softmax_scale, int64_t num_groups, bool return_mass) {
  at::NoGradGuard no_grad;  // a kernel: gradients come from flow_attention_bwd
  // Worker threads do not inherit torch.inference_mode: the buffers they update in place must be
  // normal tensors, not inference tensors.
  const c10::InferenceMode normal_tensors(false);
  const Layout L = make_layout(q, k, q_groups, k_groups, scale, bias, weight, pair_bits,
                               softmax_scale, num_groups);
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);
  at::Tensor out = at::zeros({L.batch, L.nq, L.heads, L.dim}, qf.options());
  at::Tensor lse = at::empty({L.batch, L.heads, L.nq}, qf.options());
  at::Tensor mass = return_mass ? at::zeros({L.batch, L.heads, L.nq, L.groups}, qf.options())
                                : at::empty({0}, qf.options());
  float* lse_p = lse.data_ptr<float>();
  float* mass_p = return_mass ? mass.data_ptr<float>() : nullptr;
  const int64_t q_tiles = (L.nq + kBlockM - 1) / kBlockM, G = L.groups, D = L.dim;
  at::parallel_for(0, L.batch * L.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_buf = at::empty({kBlockM, L.block_n}, qf.options());
    float* sp = s_buf.data_ptr<float>();
    std::vector<float> m(kBlockM), l(kBlockM), alpha(kBlockM), acc_mass(kBlockM * G);
    std::vector<KeyRun> runs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (L.heads * q_tiles), h = (task / q_tiles) % L.heads;
      const int64_t i0 = (task % q_tiles) * kBlockM, rows = std::min(kBlockM, L.nq - i0);
      const at::Tensor qb = head(qf, b, h).narrow(0, i0, rows), kh = head(kf, b, h),
                       vh = head(vf, b, h);
      at::Tensor acc = head(out, b, h).narrow(0, i0, rows);  // accumulates in place
      float* accp = acc.data_ptr<float>();
      const int64_t acc_stride = acc.stride(0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc_mass.begin(), acc_mass.end(), 0.f);
      for (int64_t j0 = 0; j0 < L.nk; j0 += L.block_n) {
        const int64_t cols = std::min(L.block_n, L.nk - j0);
        if (L.tile_blocked(b, i0, i0 + rows, j0, j0 + cols)) continue;
        at::Tensor s = s_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(s, qb, kh.narrow(0, j0, cols).t());
        key_runs(L, b, j0, cols, runs);
        apply_rules(L, b, h, i0, rows, j0, cols, runs, sp, L.block_n);
        for (int64_t r = 0; r < rows; ++r) {  // new running max; scores shifted for the exp
          float* srow = sp + r * L.block_n;
          float row_max = kNegInf;
          for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, srow[c]);
          const float m_new = std::max(m[r], row_max);
          const float m_safe = std::isinf(m_new) ? 0.f : m_new;  // rows blocked so far stay 0
          alpha[r] = std::exp(m[r] - m_safe);
          for (int64_t c = 0; c < cols; ++c) srow[c] -= m_safe;
          m[r] = m_new;
        }
        s.exp_();
        for (int64_t r = 0; r < rows; ++r) {  // P -> weighted P, row sums, mass, rescaled state
          const int32_t a = L.qg(b, i0 + r);
          float* srow = sp + r * L.block_n;
          float* mrow = acc_mass.data() + r * G;
          for (int64_t g = 0; g < G; ++g) mrow[g] *= alpha[r];
          float sum = 0.f;
          for (const KeyRun& run : runs) {
            float run_sum = 0.f;
            for (int64_t c = run.begin; c < run.end; ++c) run_sum += srow[c];
            const float w = pair_rules(L, h, a, run.group).weight;
            if (w != 1.f)
              for (int64_t c = run.begin; c < run.end; ++c) srow[c] *= w;
            sum += run_sum;
            mrow[run.group] += run_sum * w;
          }
          l[r] = l[r] * alpha[r] + sum;
          for (int64_t d = 0; d < D; ++d) accp[r * acc_stride + d] *= alpha[r];
        }
        acc.addmm_(s, vh.narrow(0, j0, cols));
      }
      const int64_t row0 = (b * L.heads + h) * L.nq + i0;  // [B, H, Nq] row of query i0
      for (int64_t r = 0; r < rows; ++r) {
        const bool blocked = l[r] == 0.f;
        const float inv = blocked ? 0.f : 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) accp[r * acc_stride + d] *= inv;
        lse_p[row0 + r] = blocked ? kNegInf : m[r] + std::log(l[r]);
        if (return_mass) {
          float* dst = mass_p + (row0 + r) * G;
          for (int64_t g = 0; g < G; ++g) dst[g] = acc_mass[r * G + g] * inv;
        }
      }
    }
  });
  return {out.to(q.scalar_type()), lse, mass};
}

// Probabilities P of one tile (row stride ld), recomputed in place over its raw scores from the
// saved LSE.
void tile_probabilities(const Layout& L, int64_t b, int64_t h, int64_t i0, int64_t rows,
                        int64_t j0, int64_t cols, const std::vector<KeyRun>& runs,
                        const float* lse_row, at::Tensor& tile, int64_t ld) {
  float* s = tile.data_ptr<float>();
  apply_rules(L, b, h, i0, rows, j0, cols, runs, s, ld);
  for (int64_t r = 0; r < rows; ++r) {
    // a fully blocked row (lse = -inf) keeps P = 0
    const float lse_i = std::isinf(lse_row[r]) ? std::numeric_limits<float>::infinity() : lse_row[r];
    for (int64_t c = 0; c < cols; ++c) s[r * ld + c] -= lse_i;
  }
  tile.exp_();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_attention_bwd(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlse,
    const c10::optional<at::Tensor>& dmass, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& mass, const c10::optional<at::Tensor>& q_groups,
    const c10::optional<at::Tensor>& k_groups, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pair_bits, double softmax_scale, int64_t num_groups) {
  at::NoGradGuard no_grad;
  const c10::InferenceMode normal_tensors(false);  // as in flow_attention_fwd
  const Layout L = make_layout(q, k, q_groups, k_groups, scale, bias, weight, pair_bits,
                               softmax_scale, num_groups);
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v), dof = as_float(dout);
  const at::Tensor lsef = lse.to(at::kFloat).contiguous();
  // delta = dO.O + dmass.mass - dlse, one value per query row
  at::Tensor delta = (dof * as_float(out)).sum(-1).permute({0, 2, 1});  // [B, H, Nq]
  const bool has_dmass = dmass.has_value() && mass.has_value();
  at::Tensor dmassf;
  if (has_dmass) {
    dmassf = dmass->to(at::kFloat).contiguous();
    delta += (dmassf * mass->to(at::kFloat)).sum(-1);
  }
  if (dlse.has_value()) delta -= dlse->to(at::kFloat);
  delta = delta.contiguous();
  // contiguous whatever the inputs' strides, as the registered op promises torch.compile
  at::Tensor dq = at::zeros(qf.sizes(), qf.options()), dk = at::zeros(kf.sizes(), kf.options()),
             dv = at::zeros(vf.sizes(), vf.options());
  const int64_t G = L.groups;
  // raw pointers: indexing tensors inside the tile loops costs more than the tiles' arithmetic
  const float* lse_p = lsef.data_ptr<float>();
  const float* delta_p = delta.data_ptr<float>();
  const float* dmass_p = has_dmass ? dmassf.data_ptr<float>() : nullptr;

  // dS for one tile, in place over its raw scores: dS = scale * P * (weight * dW - delta), where
  // dW = dO V^T + dmass of the key's group; with `wpp`, also writes the weighted probabilities
  // weight * P there.
  auto tile_ds = [&](int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                     const at::Tensor& do_i, const at::Tensor& v_j, at::Tensor& p_tile,
                     at::Tensor& dw, std::vector<KeyRun>& runs, float* wpp) {
    const int64_t row0 = (b * L.heads + h) * L.nq + i0;  // [B, H, Nq] row of query i0
    key_runs(L, b, j0, cols, runs);
    tile_probabilities(L, b, h, i0, rows, j0, cols, runs, lse_p + row0, p_tile, L.block_n);
    float* pp = p_tile.data_ptr<float>();
    at::Tensor dw_tile = dw.narrow(0, 0, rows).narrow(1, 0, cols);
    at::mm_out(dw_tile, do_i, v_j.t());
    const float* dwp = dw.data_ptr<float>();
    const float* delta_row = delta_p + row0;
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t a = L.qg(b, i0 + r);
      const float* dm = has_dmass ? dmass_p + (row0 + r) * G : nullptr;
      const float d = delta_row[r];
      for (const KeyRun& run : runs) {
        const PairRules p = pair_rules(L, h, a, run.group);
        const float dmr = dm ? dm[run.group] : 0.f;
        for (int64_t c = run.begin; c < run.end; ++c) {
          const int64_t e = r * L.block_n + c;
          if (wpp) wpp[e] = p.weight * pp[e];
          pp[e] = p.scale * pp[e] * (p.weight * (dwp[e] + dmr) - d);
        }
      }
    }
  };

  const int64_t q_tiles = (L.nq + kBlockM - 1) / kBlockM, k_tiles = (L.nk + L.block_n - 1) / L.block_n;
  // dk, dv: each task owns one key tile of one (batch, head)
  at::parallel_for(0, L.batch * L.heads * k_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor p = at::empty({kBlockM, L.block_n}, qf.options()), dw = at::empty_like(p);
    at::Tensor wp = at::empty_like(p);
    std::vector<KeyRun> runs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (L.heads * k_tiles), h = (task / k_tiles) % L.heads;
      const int64_t j0 = (task % k_tiles) * L.block_n, cols = std::min(L.block_n, L.nk - j0);
      at::Tensor dk_b = head(dk, b, h).narrow(0, j0, cols), dv_b = head(dv, b, h).narrow(0, j0, cols);
      const at::Tensor qh = head(qf, b, h), doh = head(dof, b, h);
      const at::Tensor k_j = head(kf, b, h).narrow(0, j0, cols), v_j = head(vf, b, h).narrow(0, j0, cols);
      for (int64_t i0 = 0; i0 < L.nq; i0 += kBlockM) {
        const int64_t rows = std::min(kBlockM, L.nq - i0);
        if (L.tile_blocked(b, i0, i0 + rows, j0, j0 + cols)) continue;
        const at::Tensor q_i = qh.narrow(0, i0, rows), do_i = doh.narrow(0, i0, rows);
        at::Tensor p_tile = p.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(p_tile, q_i, k_j.t());
        tile_ds(b, h, i0, rows, j0, cols, do_i, v_j, p_tile, dw, runs, wp.data_ptr<float>());
        dv_b.addmm_(wp.narrow(0, 0, rows).narrow(1, 0, cols).t(), do_i);
        dk_b.addmm_(p_tile.t(), q_i, 1.0, L.tau);
      }
    }
  });
  // dq: each task owns one query tile of one (batch, head)
  at::parallel_for(0, L.batch * L.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor p = at::empty({kBlockM, L.block_n}, qf.options()), dw = at::empty_like(p);
    std::vector<KeyRun> runs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (L.heads * q_tiles), h = (task / q_tiles) % L.heads;
      const int64_t i0 = (task % q_tiles) * kBlockM, rows = std::min(kBlockM, L.nq - i0);
      at::Tensor dq_b = head(dq, b, h).narrow(0, i0, rows);
      const at::Tensor q_i = head(qf, b, h).narrow(0, i0, rows), do_i = head(dof, b, h).narrow(0, i0, rows);
      const at::Tensor kh = head(kf, b, h), vh = head(vf, b, h);
      for (int64_t j0 = 0; j0 < L.nk; j0 += L.block_n) {
        const int64_t cols = std::min(L.block_n, L.nk - j0);
        if (L.tile_blocked(b, i0, i0 + rows, j0, j0 + cols)) continue;
        const at::Tensor k_j = kh.narrow(0, j0, cols);
        at::Tensor p_tile = p.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(p_tile, q_i, k_j.t());
        tile_ds(b, h, i0, rows, j0, cols, do_i, vh.narrow(0, j0, cols), p_tile, dw, runs, nullptr);
        dq_b.addmm_(p_tile, k_j, 1.0, L.tau);
      }
    }
  });
  auto back = [](const at::Tensor& x, const at::Tensor& like) {
    return x.to(like.scalar_type());
  };
  return {back(dq, q), back(dk, k), back(dv, v)};
}

}  // namespace

TORCH_LIBRARY(ditflow_cpp, m) {
  m.def("flow_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_groups, Tensor? k_groups, "
        "Tensor? scale, Tensor? bias, Tensor? weight, Tensor? pair_bits, float softmax_scale, "
        "int num_groups, bool return_mass) -> (Tensor, Tensor, Tensor)");
  m.def("flow_attention_bwd(Tensor dout, Tensor? dlse, Tensor? dmass, Tensor q, Tensor k, "
        "Tensor v, Tensor out, Tensor lse, Tensor? mass, Tensor? q_groups, Tensor? k_groups, "
        "Tensor? scale, Tensor? bias, Tensor? weight, Tensor? pair_bits, float softmax_scale, "
        "int num_groups) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ditflow_cpp, CPU, m) {
  m.impl("flow_attention_fwd", &flow_attention_fwd);
  m.impl("flow_attention_bwd", &flow_attention_bwd);
}

// An (empty) Python module, so `import ditflow._C` loads the library and runs the registrations
// above.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ditflow's C++ CPU kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
