// fastsched._cpu_ext: the compiled CPU executor of the fused optimizer step.
//
// A plain CPython extension (no torch headers): every function takes integer addresses and
// sizes, and walks the tables of fastsched.optim._tables (column names generated from
// kernels/layout.py into generated/layout.h). See fastsched/optim/_cpu.py for the Python side.
// Below fp32 the update reads each row's T_SDTYPE (state storage: float32 / bfloat16 / float16
// / float64 / 8-bit codes with block scales at T_Q1 / T_Q2) and T_MODE (the float32 master at
// T_MASTER, stochastic rounding keyed by T_SR_KEY / T_ELEM0); the dtypes array is the
// parameters'. Rows stored as their parameter and written to nearest keep the fast paths.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(_OPENMP)  // (a build without OpenMP runs the same loops on one thread)
#include <omp.h>
#endif

#include <atomic>
#include <cstdint>
#include <vector>

#include "fused.h"
#include "kernels.h"
#include "layout.h"

// fused_wm's variants (fused.h) are compiled in fused_f32.cpp and fused_16.cpp: see there
FS_FUSED_WM(extern template)

namespace {

using namespace fs;

// -- the tables --------------------------------------------------------------------------------

struct Row {  // one row of the tensors table
    const int64_t* r;
    template <class T>
    T* ptr(int64_t col) const { return reinterpret_cast<T*>(r[col]); }
    int64_t operator[](int64_t col) const { return r[col]; }
};

inline Row row(const int64_t* tensors, int64_t i) { return Row{tensors + i * L::T_COLS}; }

struct Blk {  // a block of one tensor: elements [start, start + len)
    int64_t t, start, len;
};

// blocks of BLK elements; blen[i] > 0: tensor i in blocks of blen[i] (whole ALLoRA units)
std::vector<Blk> flat_blocks(const int64_t* tensors, int64_t n, const int64_t* blen = nullptr) {
    std::vector<Blk> out;
    for (int64_t i = 0; i < n; i++) {
        const int64_t numel = row(tensors, i)[L::T_NUMEL];
        const int64_t b = blen && blen[i] > 0 ? blen[i] : BLK;
        for (int64_t s = 0; s < numel; s += b) out.push_back({i, s, numel - s < b ? numel - s : b});
    }
    return out;
}

//: blocks per range a thread takes at a time in the statistics and update passes
constexpr int64_t CHUNK_BLOCKS = 16;
//: CHUNK_BLOCKS, or what the module's chunk_blocks() set (other values only to test range
//: boundaries: the bits are the same); atomic as pipe_on
std::atomic<int64_t> chunk_blocks{CHUNK_BLOCKS};

// The blocks of a pass as contiguous ranges of chunk_blocks that the threads take in turn
// (OpenMP's dynamic schedule over the ranges; partials are per block and combined in block
// order: any assignment gives the same bits). A static split (one range per thread) waited for
// the slower thread: on a shared 2-vCPU VM one thread took up to 1.36x the other's time over the
// same number of elements (and a static split by elements instead of blocks moved nothing).
// Alternating both builds in one process, 2 threads, step time against the static split: GPT-2
// x0.1 fp32 AdamW 0.94-0.98x, with clipping 0.96-1.00x, SGD 0.97x, bf16 ALLoRA rows 0.90x, bf16
// with stochastic rounding and 8-bit states 0.93-0.98x; Llama-1B x0.1 AdamW 0.96-0.98x, with
// clipping 1.01x (noise); its statistics pass 0.97x. Ranges of 4, 32 or 64 blocks: the same
// within noise. One thread takes the whole pass as one range.
inline int64_t range_blocks(int64_t nb, int64_t nthreads) {
    return nthreads > 1 ? chunk_blocks.load(std::memory_order_relaxed) : (nb > 0 ? nb : 1);
}

// ALLoRA units that the update pass sums itself, block by block: contiguous units (rows, the
// tensor) of at most BLK elements; the elements per block of such a tensor (whole units), else 0
// the elements of the shortest run of whole units an update call may take: a unit, or with
// 8-bit states lcm(unit, Q_BLOCK) (a call encodes whole quantisation blocks: their scales are of
// the new values of all their elements)
inline int64_t unit_run(Row r) {
    const int64_t ulen = r[L::T_ULEN];
    if (r[L::T_SDTYPE] == L::STATE_8BIT && (r[L::T_S1] || r[L::T_S2])) {
        int64_t a = ulen, b = L::Q_BLOCK;
        while (b) {
            const int64_t t = a % b;
            a = b;
            b = t;
        }
        return ulen / a * L::Q_BLOCK;
    }
    return ulen;
}

inline int64_t inblock_len(Row r) {
    const int64_t nu = r[L::T_NUNITS], ulen = r[L::T_ULEN];
    if (r[L::T_ESTRIDE] != 1 || nu < 1 || ulen < 1 || ulen > BLK || nu * ulen != r[L::T_NUMEL])
        return 0;
    if (nu > 1 && r[L::T_USTRIDE] != ulen) return 0;
    // units whose run (unit_run) is over a block are summed by a pass of their own, the update
    // then in blocks of BLK
    const int64_t u = unit_run(r);
    return u > BLK ? 0 : (BLK / u) * u;
}

// the state storage of a row (a STATE_* code; a row without states: its parameter's dtype)
inline int64_t state_code(Row r, int64_t dtype) {
    if (!r[L::T_S1] && !r[L::T_S2] && !r[L::T_S3]) return dtype;
    return r[L::T_SDTYPE];
}

// a float64 row that steps in float64: its states float64 too (or none), no master / SR
inline bool steps_f64(Row r, int64_t dtype) {
    return dtype == F64 && state_code(r, dtype) == F64 && r[L::T_MODE] == 0;
}

// the weights the step reads: the float32 master (MODE_MASTER) or the parameter; returns the
// dtype code of *out's T_P (buf: storage of a row copy pointing T_P at the master)
inline int64_t weights(Row r, int64_t dtype, int64_t* buf, Row* out) {
    if (!(r[L::T_MODE] & L::MODE_MASTER)) {
        *out = r;
        return dtype;
    }
    for (int64_t c = 0; c < L::T_COLS; c++) buf[c] = r[c];
    buf[L::T_P] = r[L::T_MASTER];
    *out = Row{buf};
    return F32;
}

// the low-precision columns of every row (update pass); false with the error set
bool check_rows(const int64_t* tensors, const int64_t* dtypes, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        Row r = row(tensors, i);
        const int64_t sd = r[L::T_SDTYPE], mode = r[L::T_MODE];
        const char* bad = nullptr;
        if (sd < L::STATE_F32 || sd > L::STATE_8BIT)
            bad = "unknown state storage code (T_SDTYPE)";
        else if (mode & ~(L::MODE_MASTER | L::MODE_SR))
            bad = "unknown mode bits (T_MODE)";
        else if ((mode & L::MODE_MASTER) && (mode & L::MODE_SR))
            bad = "MODE_MASTER and MODE_SR together";
        else if ((mode & L::MODE_MASTER) && !r[L::T_MASTER])
            bad = "MODE_MASTER without a master copy (T_MASTER = 0)";
        else if ((mode & L::MODE_SR) && dtypes[i] != BF16)
            bad = "stochastic rounding (MODE_SR) of a parameter that is not bfloat16";
        else if (sd == L::STATE_8BIT && r[L::T_S3])
            bad = "8-bit states with amsgrad (max_exp_avg_sq is never 8-bit)";
        else if (sd == L::STATE_8BIT &&
                 ((r[L::T_S1] && !r[L::T_Q1]) || (r[L::T_S2] && !r[L::T_Q2])))
            bad = "8-bit states without their scales (T_Q1 / T_Q2 = 0)";
        if (bad) {
            PyErr_Format(PyExc_ValueError, "row %lld: %s (T_SDTYPE %lld, T_MODE %lld)",
                         (long long)i, bad, (long long)sd, (long long)mode);
            return false;
        }
    }
    return true;
}

bool check_dtypes(const int64_t* dtypes, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (dtypes[i] < F32 || dtypes[i] > F64) {
            PyErr_Format(PyExc_ValueError, "row %lld: unknown dtype code %lld", (long long)i,
                         (long long)dtypes[i]);
            return false;
        }
    return true;
}

// -- statistics pass ---------------------------------------------------------------------------

template <class E>
void grad_sums_any(const void* g, int64_t n, bool guard, double* out) {
    auto* gp = static_cast<const typename E::T*>(g);
    if (guard)
        grad_sums<E, true>(gp, n, out);
    else
        grad_sums<E, false>(gp, n, out);
}

template <class E>
void grad_sums_k_any(const void* const* g, const int64_t* n, bool guard, double* const* out) {
    auto* gp = reinterpret_cast<const typename E::T* const*>(g);
    if (guard)
        grad_sums_k<E, STATS_STREAMS, true>(gp, n, out);
    else
        grad_sums_k<E, STATS_STREAMS, false>(gp, n, out);
}

// the statistics of blocks [b0, b1) (one thread's): STATS_STREAMS runs of consecutive blocks
// read side by side (grad_sums_k), block j of every run together where they share a dtype;
// each block's sums as grad_sums alone (the partials, and so the result, are the same bits
// whatever the threads and the runs)
void stats_range(const int64_t* tensors, const int64_t* dtypes, const std::vector<Blk>& blocks,
                 int64_t b0, int64_t b1, bool guard, double* part) {
    constexpr int K = STATS_STREAMS;
    auto one = [&](int64_t b) {
        const Blk& k = blocks[b];
        Row r = row(tensors, k.t);
        double* out = &part[3 * b];
        switch (dtypes[k.t]) {
            case F32: grad_sums_any<TF32>(r.ptr<float>(L::T_G) + k.start, k.len, guard, out); break;
            case BF16: grad_sums_any<TBF16>(r.ptr<uint16_t>(L::T_G) + k.start, k.len, guard, out); break;
            case F16: grad_sums_any<TF16>(r.ptr<half_t>(L::T_G) + k.start, k.len, guard, out); break;
            default: grad_sums_any<TF64>(r.ptr<double>(L::T_G) + k.start, k.len, guard, out); break;
        }
    };
    const int64_t run = (b1 - b0 + K - 1) / K;
    for (int64_t j = 0; j < run; j++) {
        int64_t idx[K];
        bool all = true;
        for (int k = 0; k < K; k++) {
            idx[k] = b0 + k * run + j;
            all = all && idx[k] < b1 && dtypes[blocks[idx[k]].t] == dtypes[blocks[idx[0]].t];
        }
        if (!all) {
            for (int k = 0; k < K; k++)
                if (idx[k] < b1) one(idx[k]);
            continue;
        }
        const void* g[K];
        int64_t n[K];
        double* out[K];
        const int64_t dt = dtypes[blocks[idx[0]].t];
        const int64_t esz = dtype_size(dt);
        for (int k = 0; k < K; k++) {
            const Blk& bk = blocks[idx[k]];
            g[k] = row(tensors, bk.t).ptr<const char>(L::T_G) + bk.start * esz;
            n[k] = bk.len;
            out[k] = &part[3 * idx[k]];
        }
        switch (dt) {
            case F32: grad_sums_k_any<TF32>(g, n, guard, out); break;
            case BF16: grad_sums_k_any<TBF16>(g, n, guard, out); break;
            case F16: grad_sums_k_any<TF16>(g, n, guard, out); break;
            default: grad_sums_k_any<TF64>(g, n, guard, out); break;
        }
    }
}

PyObject* py_grad_stats(PyObject*, PyObject* args) {
    long long ta, da, n, tsa;
    int guard, nt;
    if (!PyArg_ParseTuple(args, "LLLLii", &ta, &da, &n, &tsa, &guard, &nt)) return nullptr;
    auto* tensors = reinterpret_cast<const int64_t*>(ta);
    auto* dtypes = reinterpret_cast<const int64_t*>(da);
    auto* tstat = reinterpret_cast<double*>(tsa);
    if (!check_dtypes(dtypes, n)) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    std::vector<Blk> blocks = flat_blocks(tensors, n);
    const int64_t nb = static_cast<int64_t>(blocks.size());
    std::vector<double> part(3 * (nb + 1));
    const int64_t per = range_blocks(nb, nt), nr = (nb + per - 1) / per;
    // ranges of blocks taken in turn (range_blocks)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c = 0; c < nr; c++)
        stats_range(tensors, dtypes, blocks, c * per, std::min(nb, (c + 1) * per), guard != 0,
                    part.data());
    // per tensor, in block order
    for (int64_t i = 0; i < n; i++) {
        double* ts = tstat + i * L::TS_COLS;
        ts[L::TS_SQ] = ts[L::TS_ABS] = ts[L::TS_NONFINITE] = 0.0;
    }
    for (int64_t b = 0; b < nb; b++) {
        double* ts = tstat + blocks[b].t * L::TS_COLS;
        ts[L::TS_SQ] += part[3 * b];
        ts[L::TS_ABS] += part[3 * b + 1];
        ts[L::TS_NONFINITE] += part[3 * b + 2];
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// -- finalize: _reference.finalize, float64, one thread ----------------------------------------

PyObject* py_finalize(PyObject*, PyObject* args) {
    long long kind, ta, n, ga, n_groups, sa, s64a, scha, nseg, ca, cfga, tsa, gsta, lra, ha, hpa;
    long long hlen, gsa, fia;
    int stats, clip, guard;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLLLLLLLLiii", &kind, &ta, &n, &ga, &n_groups, &sa,
                          &s64a, &scha, &nseg, &ca, &cfga, &tsa, &gsta, &lra, &ha, &hpa, &hlen,
                          &gsa, &fia, &stats, &clip, &guard))
        return nullptr;
    auto* scal64 = reinterpret_cast<double*>(s64a);  // the scalars before rounding (or null)
    auto* tensors = reinterpret_cast<const int64_t*>(ta);
    auto* groups = reinterpret_cast<const double*>(ga);
    auto* scal = reinterpret_cast<float*>(sa);
    auto* sched = reinterpret_cast<const double*>(scha);
    auto* clock = reinterpret_cast<int64_t*>(ca);
    auto* cfg = reinterpret_cast<const double*>(cfga);
    auto* tstat = reinterpret_cast<double*>(tsa);
    auto* gstat = reinterpret_cast<double*>(gsta);
    auto* lr_out = reinterpret_cast<double*>(lra);
    auto* hist = reinterpret_cast<double*>(ha);
    auto* hist_pos = reinterpret_cast<int64_t*>(hpa);
    auto* grad_scale = reinterpret_cast<const float*>(gsa);
    auto* found_inf = reinterpret_cast<const float*>(fia);
    if (nseg < 1) {
        PyErr_SetString(PyExc_ValueError, "finalize: empty schedule table");
        return nullptr;
    }
    const double t0 = static_cast<double>(*clock);
    const double factor = schedule_value(sched, nseg, t0);
    const double inv_scale = grad_scale ? 1.0 / static_cast<double>(*grad_scale) : 1.0;
    double coef = 1.0, gnorm = 0.0, gl1 = 0.0, nonfinite = 0.0;
    bool active = true;
    if (stats) {
        double sq = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double* ts = tstat + i * L::TS_COLS;
            sq += ts[L::TS_SQ];
            gl1 += ts[L::TS_ABS];
            nonfinite += ts[L::TS_NONFINITE];
            ts[L::TS_NORM] = std::sqrt(ts[L::TS_SQ]) * inv_scale;
        }
        gnorm = std::sqrt(sq) * inv_scale;
        gl1 = gl1 * inv_scale;
        if (clip) {  // clip_grad_norm_: max_norm / (norm + 1e-6), clamped at 1 (nan stays nan)
            double c = cfg[L::CFG_MAX_GRAD_NORM] / (gnorm + 1e-6);
            coef = c > 1.0 ? 1.0 : c;
        }
        if (guard) active = nonfinite == 0.0;
    }
    if (found_inf) active = active && (*found_inf == 0.0f);
    const double act = active ? 1.0 : 0.0;
    for (int64_t i = 0; i < n; i++) {
        Row r = row(tensors, i);
        const double* g = groups + r[L::T_GROUP] * L::G_COLS;
        float* step_ptr = r.ptr<float>(L::T_STEP);
        const double step = *step_ptr;
        const double new_step = step + act;
        const double lr = g[L::G_LR] * factor;
        const double sign = g[L::G_MAXIMIZE] != 0.0 ? -1.0 : 1.0;
        double out[L::S_COLS] = {0};
        if (kind == L::KIND_ADAM) {
            const double b1 = g[L::G_ADAM_BETA1], b2 = g[L::G_ADAM_BETA2];
            const double wd = g[L::G_WEIGHT_DECAY];
            const bool dec = g[L::G_ADAM_DECOUPLED] != 0.0;
            const double bc1 = 1.0 - std::pow(b1, new_step);
            const double bc2 = 1.0 - std::pow(b2, new_step);
            out[L::S_ADAM_STEP_SIZE] = lr / bc1;
            out[L::S_ADAM_BC2_SQRT] = std::sqrt(bc2);
            out[L::S_ADAM_DECAY_MUL] = dec ? 1.0 - lr * wd : 1.0;
            out[L::S_ADAM_L2] = dec ? 0.0 : wd;
            out[L::S_ADAM_OMB1] = 1.0 - b1;  // 1 - beta in float64, rounded once
            out[L::S_ADAM_OMB2] = 1.0 - b2;
            out[L::S_ADAM_EPS] = g[L::G_ADAM_EPS];
            out[L::S_ADAM_BC1] = bc1;
        } else {  // torch.optim.SGD: the first step copies d_p into the momentum buffer
            const bool first = step == 0.0;
            const double mom = g[L::G_SGD_MOMENTUM];
            out[L::S_SGD_MOM_A] = first ? 0.0 : mom;
            out[L::S_SGD_MOM_B] = first ? 1.0 : 1.0 - g[L::G_SGD_DAMPENING];
            out[L::S_SGD_WEIGHT_DECAY] = g[L::G_WEIGHT_DECAY];
            out[L::S_SGD_NESTEROV] = g[L::G_SGD_NESTEROV];
            out[L::S_SGD_MOMENTUM] = mom;
        }
        out[L::S_GRAD_MUL] = sign * coef * inv_scale;
        out[L::S_ACTIVE] = act;
        out[L::S_LR] = lr;
        out[L::S_INV_ETA2] = g[L::G_INV_ETA2];
        out[L::S_ALLORA_UPDATE] = g[L::G_ALLORA_UPDATE];
        float* sc = scal + i * L::S_COLS;
        for (int64_t c = 0; c < L::S_COLS; c++) sc[c] = static_cast<float>(out[c]);
        if (scal64)
            for (int64_t c = 0; c < L::S_COLS; c++) scal64[i * L::S_COLS + c] = out[c];
        *step_ptr = static_cast<float>(new_step);
    }
    *clock += active ? 1 : 0;
    if (stats) {
        const double skipped = 1.0 - act;
        for (int64_t k = 0; k < n_groups; k++) lr_out[k] = groups[k * L::G_COLS + L::G_LR] * factor;
        const double lr0 = groups[L::G_LR] * factor;
        gstat[L::STAT_GRAD_NORM] = gnorm;
        gstat[L::STAT_GRAD_NORM_L1] = gl1;
        gstat[L::STAT_CLIP_COEF] = coef;
        gstat[L::STAT_SKIPPED] = skipped;
        gstat[L::STAT_SKIP_COUNT] += skipped;
        gstat[L::STAT_NONFINITE] = nonfinite;
        gstat[L::STAT_LR0] = lr0;
        gstat[L::STAT_INV_SCALE] = inv_scale;
        if (hlen > 0) {
            const int64_t pos = *hist_pos;
            double* h = hist + (pos % hlen) * L::H_COLS;
            h[L::H_STEP] = t0;
            h[L::H_GRAD_NORM] = gnorm;
            h[L::H_LR] = lr0;
            h[L::H_SKIPPED] = skipped;
            h[L::H_GRAD_NORM_L1] = gl1;
            *hist_pos = pos + 1;
        }
    }
    Py_RETURN_NONE;
}

// -- ALLoRA unit sums of squares ---------------------------------------------------------------
// Units with contiguous elements (rows, the tensor: T_ESTRIDE == 1) are summed by one thread
// each (or, when longer than a block, in block pieces combined in order); column units
// (T_USTRIDE == 1, T_ESTRIDE == columns) by ranges of columns, row after row.

constexpr int64_t COLW = 256;  // columns per work item of column units
constexpr int64_t COL_AHEAD = 4;  // rows ahead whose piece a column item requests (unit_item)

struct UItem {
    int64_t t, a, b;  // tensor; units [a, b) (whole), or unit a and its elements [b, b + BLK)
    int kind;         // 0: whole contiguous units, 1: a piece of a long unit, 2: column range
};

template <class E>
void unit_item(const UItem& it, Row r, double* usums, double* part) {
    const auto* p = r.ptr<const typename E::T>(L::T_P);
    const int64_t ulen = r[L::T_ULEN], ustride = r[L::T_USTRIDE];
    if (it.kind == 0) {
        for (int64_t u = it.a; u < it.b; u++) usums[u] = sum_sq<E, true>(p + u * ustride, ulen);
    } else if (it.kind == 1) {
        const int64_t len = ulen - it.b < BLK ? ulen - it.b : BLK;
        *part = sum_sq<E, true>(p + it.a * ustride + it.b, len);
    } else {
        const int64_t cols = r[L::T_ESTRIDE], rows = ulen, w = it.b - it.a;
        double acc[COLW] = {0};
        for (int64_t i = 0; i < rows; i++) {
            const auto* q = p + i * cols + it.a;
            // the hardware does not follow rows of w elements at a stride of cols: the piece
            // COL_AHEAD rows on requested into L1 first (as read_ahead)
            if (i + COL_AHEAD < rows) prefetch_bytes(q + COL_AHEAD * cols, w * sizeof(*q));
            if constexpr (std::is_same<E, TF16>::value) {  // F16C (GCC converts one by one)
                alignas(64) float x[COLW];
                chunk_in<E>(q, w, x);
                for (int64_t c = 0; c < w; c++) acc[c] += double(x[c]) * double(x[c]);
            } else {
                for (int64_t c = 0; c < w; c++) {
                    const double x = E::ld(q[c]);
                    acc[c] += x * x;
                }
            }
        }
        for (int64_t c = 0; c < w; c++) usums[it.a + c] = acc[c];
    }
}

// all ALLoRA sums into usums[uoff[i] + unit]; returns false (error set) on a bad geometry
bool unit_sums(const int64_t* tensors, const int64_t* dtypes, int64_t n, const int64_t* uoff,
               double* usums, int nt, const int64_t* skip = nullptr) {
    std::vector<UItem> items;
    std::vector<int64_t> first_piece;  // per long unit: its first item (pieces are consecutive)
    for (int64_t i = 0; i < n; i++) {
        if (uoff[i] < 0 || (skip && skip[i] > 0)) continue;
        Row r = row(tensors, i);
        const int64_t ulen = r[L::T_ULEN], nu = r[L::T_NUNITS];
        const int64_t ustride = r[L::T_USTRIDE], estride = r[L::T_ESTRIDE];
        if (r[L::T_NUMEL] == 0 || nu == 0) continue;
        if (estride == 1) {
            if (ulen <= BLK) {
                const int64_t per = BLK / (ulen > 0 ? ulen : 1);
                for (int64_t u = 0; u < nu; u += per) items.push_back({i, u, u + per < nu ? u + per : nu, 0});
            } else {
                for (int64_t u = 0; u < nu; u++)
                    for (int64_t s = 0; s < ulen; s += BLK) items.push_back({i, u, s, 1});
            }
        } else if (ustride == 1 && estride == nu) {
            for (int64_t c = 0; c < nu; c += COLW) items.push_back({i, c, c + COLW < nu ? c + COLW : nu, 2});
        } else {
            PyErr_Format(PyExc_ValueError, "row %lld: unsupported ALLoRA unit geometry (len %lld, "
                         "unit stride %lld, element stride %lld)", (long long)i, (long long)ulen,
                         (long long)ustride, (long long)estride);
            return false;
        }
    }
    const int64_t ni = static_cast<int64_t>(items.size());
    std::vector<double> part(ni + 1, 0.0);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t k = 0; k < ni; k++) {
        const UItem& it = items[k];
        int64_t wbuf[L::T_COLS];
        Row r;
        const int64_t code = weights(row(tensors, it.t), dtypes[it.t], wbuf, &r);
        double* us = usums + uoff[it.t];
        switch (code) {
            case F32: unit_item<TF32>(it, r, us, &part[k]); break;
            case BF16: unit_item<TBF16>(it, r, us, &part[k]); break;
            case F16: unit_item<TF16>(it, r, us, &part[k]); break;
            default: unit_item<TF64>(it, r, us, &part[k]); break;
        }
    }
    // long units: pieces in element order
    for (int64_t k = 0; k < ni; k++) {
        const UItem& it = items[k];
        if (it.kind != 1) continue;
        double* u = usums + uoff[it.t] + it.a;
        if (it.b == 0) *u = 0.0;
        *u += part[k];
    }
    Py_END_ALLOW_THREADS
    return true;
}

PyObject* py_unit_sums(PyObject*, PyObject* args) {
    long long ta, da, n, ua, sa;
    int nt;
    if (!PyArg_ParseTuple(args, "LLLLLi", &ta, &da, &n, &ua, &sa, &nt)) return nullptr;
    auto* dtypes = reinterpret_cast<const int64_t*>(da);
    if (!check_dtypes(dtypes, n)) return nullptr;
    if (!unit_sums(reinterpret_cast<const int64_t*>(ta), dtypes, n,
                   reinterpret_cast<const int64_t*>(ua), reinterpret_cast<double*>(sa), nt))
        return nullptr;
    Py_RETURN_NONE;
}

// -- update pass -------------------------------------------------------------------------------

template <class E, bool STATS, bool SVEC>
void adam_call(const AdamScalT<typename E::C>& s, Row r, int64_t off, int64_t len, const float* gs, Lanes* ls) {
    using T = typename E::T;
    T* p = r.ptr<T>(L::T_P) + off;
    const T* g = r.ptr<const T>(L::T_G) + off;
    T* m = r.ptr<T>(L::T_S1) + off;
    T* v = r.ptr<T>(L::T_S2) + off;
    if (r[L::T_S3])
        adam_span<E, true, STATS, SVEC>(s, p, g, m, v, r.ptr<T>(L::T_S3) + off, len, gs, ls);
    else
        adam_span<E, false, STATS, SVEC>(s, p, g, m, v, nullptr, len, gs, ls);
}

template <class E, bool STATS, bool SVEC>
void sgd_call(const SgdScalT<typename E::C>& s, Row r, int64_t off, int64_t len,
              const float* gs, Lanes* ls) {
    using T = typename E::T;
    T* p = r.ptr<T>(L::T_P) + off;
    const T* g = r.ptr<const T>(L::T_G) + off;
    if (r[L::T_S1])
        sgd_span<E, true, STATS, SVEC>(s, p, g, r.ptr<T>(L::T_S1) + off, len, gs, ls);
    else
        sgd_span<E, false, STATS, SVEC>(s, p, g, nullptr, len, gs, ls);
}

struct Scal {
    AdamScal adam;
    SgdScal sgd;
    AdamScalT<double> adam64;  // float64 tensors (TD64) only
    SgdScalT<double> sgd64;
    template <class C>
    const AdamScalT<C>& adam_of() const {
        if constexpr (std::is_same<C, double>::value) return adam64; else return adam;
    }
    template <class C>
    const SgdScalT<C>& sgd_of() const {
        if constexpr (std::is_same<C, double>::value) return sgd64; else return sgd;
    }
};

// the scalars of a tensor's kind in C from at(column)
template <class C, class At>
void fill_scal(int64_t kind, At at, AdamScalT<C>& a, SgdScalT<C>& g) {
    if (kind == L::KIND_ADAM) {
        a.gmul = at(L::S_GRAD_MUL);
        a.step_size = at(L::S_ADAM_STEP_SIZE);
        a.bc2s = at(L::S_ADAM_BC2_SQRT);
        a.decay = at(L::S_ADAM_DECAY_MUL);
        a.l2 = at(L::S_ADAM_L2);
        a.omb1 = at(L::S_ADAM_OMB1);
        a.omb1c = C(1) - a.omb1;
        a.omb2 = at(L::S_ADAM_OMB2);
        a.omb2c = C(1) - a.omb2;
        a.eps = at(L::S_ADAM_EPS);
        a.lo = a.omb1 < C(0.5);
        a.upd = at(L::S_ALLORA_UPDATE) != C(0);
    } else {
        g.gmul = at(L::S_GRAD_MUL);
        g.lr = at(L::S_LR);
        g.mom_a = at(L::S_SGD_MOM_A);
        g.mom_b = at(L::S_SGD_MOM_B);
        g.wd = at(L::S_SGD_WEIGHT_DECAY);
        g.momentum = at(L::S_SGD_MOMENTUM);
        g.nesterov = at(L::S_SGD_NESTEROV) != C(0);
        g.upd = at(L::S_ALLORA_UPDATE) != C(0);
    }
}

// a tensor's scalars: float32 from scal; with f64 (a float64 tensor stepped in float64) also
// in float64, from scal64 (the values before their rounding), or the float32 ones without it
Scal read_scal(const float* sc, const double* sc64, int64_t kind, bool f64) {
    Scal s{};
    fill_scal<float>(kind, [&](int64_t c) { return sc[c]; }, s.adam, s.sgd);
    if (f64)
        fill_scal<double>(kind, [&](int64_t c) { return sc64 ? sc64[c] : double(sc[c]); },
                          s.adam64, s.sgd64);
    return s;
}

// one span of tensor row r: the elements [off, off + len), gradient multiplier gs (SVEC: one
// per element)
template <class E, bool STATS>
void span(int64_t kind, const Scal& s, Row r, int64_t off, int64_t len, const float* gs,
          bool svec, Lanes* ls) {
    // a float64 row here has float64 states (else lowp_block): it steps in float64
    using X = std::conditional_t<std::is_same<E, TF64>::value, TD64, E>;
    using C = typename X::C;
    if (kind == L::KIND_ADAM) {
        if (svec)
            adam_call<X, STATS, true>(s.adam_of<C>(), r, off, len, gs, ls);
        else
            adam_call<X, STATS, false>(s.adam_of<C>(), r, off, len, gs, ls);
    } else {
        if (svec)
            sgd_call<X, STATS, true>(s.sgd_of<C>(), r, off, len, gs, ls);
        else
            sgd_call<X, STATS, false>(s.sgd_of<C>(), r, off, len, gs, ls);
    }
}

// a block [start, start + len) of tensor row r, split where the ALLoRA multiplier changes
template <class E, bool STATS>
void block(int64_t kind, const Scal& s, Row r, int64_t start, int64_t len, const float* scales,
           Lanes* ls) {
    static const float one = 1.0f;
    if (!scales) {
        span<E, STATS>(kind, s, r, start, len, &one, false, ls);
        return;
    }
    const int64_t end = start + len;
    if (r[L::T_ESTRIDE] == 1) {  // rows or the tensor: one multiplier per unit
        const int64_t ulen = r[L::T_NUNITS] == 1 ? r[L::T_NUMEL] : r[L::T_ULEN];
        for (int64_t pos = start; pos < end;) {
            const int64_t u = pos / ulen, stop = (u + 1) * ulen < end ? (u + 1) * ulen : end;
            span<E, STATS>(kind, s, r, pos, stop - pos, scales + u, false, ls);
            pos = stop;
        }
    } else {  // columns: one multiplier per element of a row
        const int64_t cols = r[L::T_ESTRIDE];
        for (int64_t pos = start; pos < end;) {
            const int64_t row0 = pos / cols, stop = (row0 + 1) * cols < end ? (row0 + 1) * cols : end;
            const float* gs = scales + (pos - row0 * cols);
            // gs[i] of the span is the multiplier of element off + i
            span<E, STATS>(kind, s, r, pos, stop - pos, gs, true, ls);
            pos = stop;
        }
    }
}

//: elements per chunk of the low-precision path: whole quantisation blocks (a block of the
//: update pass starts at a multiple of Q_BLOCK of an 8-bit tensor: see inblock_len)
constexpr int64_t CH = 512;
static_assert(CH % L::Q_BLOCK == 0 && BLK % CH == 0, "chunks of whole quantisation blocks");

inline int64_t addr_at(const void* base, int64_t elem, int64_t size) {  // base - elem elements
    return reinterpret_cast<int64_t>(base) - elem * size;
}

// the elements [start, start + n) of row r through adam_fused, n the most it takes (0: none;
// the rest: lowp_block's chunks): Adam without amsgrad, float32 or bfloat16 parameters,
// float32, bfloat16 or 8-bit states, or fp16 parameters with fp16 states and no mode (plain
// fp16: its own loop; fp16 with a master or other states takes the chunks); scales: the
// ALLoRA multipliers of the units (or null)
template <bool STATS>
int64_t fused_prefix(int64_t kind, const Scal& s, Row r, int64_t pt, int64_t st, int64_t start,
                     int64_t len, const float* scales, Lanes* ls, SideSum* side) {
    if (kind != L::KIND_ADAM || r[L::T_S3] || !r[L::T_S1] || !r[L::T_S2]) return 0;
    const int64_t mode = r[L::T_MODE];
    const bool f16 = pt == F16 && st == F16 && mode == 0;  // plain fp16 (its own loop)
    if (!f16 && ((pt != F32 && pt != BF16) || (st != F32 && st != BF16 && st != L::STATE_8BIT)))
        return 0;
    if ((mode & L::MODE_SR) && pt != BF16) return 0;
    // (float32 parameters have no master copy: a ValueError before any table; fused_wm keeps
    // no master variant of them)
    if ((mode & L::MODE_MASTER) && pt == F32) return 0;
    const int64_t unit = st == L::STATE_8BIT ? L::Q_BLOCK : 16;  // whole blocks, whole groups
    const int64_t n = len / unit * unit;
    if (n == 0) return 0;
    UnitMul um{scales, 0, 0, start, s.adam.upd};
    if (scales) {  // as block(): units of rows or the tensor, or columns
        if (r[L::T_ESTRIDE] == 1)
            um.ulen = r[L::T_NUNITS] == 1 ? r[L::T_NUMEL] : r[L::T_ULEN];
        else
            um.cols = r[L::T_ESTRIDE];
        if (um.ulen < 1 && um.cols < 1) return 0;
    }
    const int64_t psz = dtype_size(pt), ssz = st == L::STATE_8BIT ? 1 : dtype_size(st);
    FusedIo io;
    io.side = side;
    io.p = r.ptr<char>(L::T_P) + start * psz;
    io.g = r.ptr<const char>(L::T_G) + start * psz;
    io.master = (mode & L::MODE_MASTER) ? r.ptr<float>(L::T_MASTER) + start : nullptr;
    io.m = r.ptr<char>(L::T_S1) + start * ssz;
    io.v = r.ptr<char>(L::T_S2) + start * ssz;
    io.mq = st == L::STATE_8BIT ? r.ptr<float>(L::T_Q1) + start / L::Q_BLOCK : nullptr;
    io.vq = st == L::STATE_8BIT ? r.ptr<float>(L::T_Q2) + start / L::Q_BLOCK : nullptr;
    io.src = (mode & L::MODE_SR) ? sr_c(static_cast<uint32_t>(r[L::T_SR_KEY]),
                                        static_cast<uint32_t>(*r.ptr<const float>(L::T_STEP)))
                                 : 0;
    io.idx0 = static_cast<uint64_t>(r[L::T_ELEM0] + start);
    const UnitMul* ump = scales ? &um : nullptr;
    if (f16)
        fused_wm<TF16, STATS>(s.adam, io, mode, st, n, ls, ump);
    else if (pt == F32)
        fused_wm<TF32, STATS>(s.adam, io, mode, st, n, ls, ump);
    else
        fused_wm<TBF16, STATS>(s.adam, io, mode, st, n, ls, ump);
    return n;
}

// A block of a row with states stored other than as its parameter (T_SDTYPE), 8-bit states,
// a master copy or stochastic rounding (T_MODE), chunk by chunk: the chunk's weights (the
// master or the parameter), gradient and states in float32 (8-bit: decoded), the float32 block
// of the fast path on them (the same operations), then the parameter (rounded to nearest even
// from the master, stochastically, or to its dtype), the states (8-bit: re-encoded per
// quantisation block) and the master written back. What adam_fused takes goes there first.
template <bool STATS>
void lowp_block(int64_t kind, const Scal& s, Row r, int64_t pt, int64_t st, int64_t start,
                int64_t len, const float* scales, Lanes* ls, SideSum* side = nullptr) {
    alignas(64) float bw[CH], bg[CH], bs[3][CH];
    int64_t fake[L::T_COLS];
    for (int64_t c = 0; c < L::T_COLS; c++) fake[c] = r[c];
    const int64_t mode = r[L::T_MODE];
    const bool master = mode & L::MODE_MASTER, sr = mode & L::MODE_SR;
    const int64_t psz = dtype_size(pt), ssz = st == L::STATE_8BIT ? 1 : dtype_size(st);
    auto* p = r.ptr<char>(L::T_P);
    const auto* g = r.ptr<const char>(L::T_G);
    float* mw = master ? r.ptr<float>(L::T_MASTER) : nullptr;
    const int64_t scol[3] = {L::T_S1, L::T_S2, L::T_S3}, qcol[3] = {L::T_Q1, L::T_Q2, 0};
    const uint32_t src = sr ? sr_c(static_cast<uint32_t>(r[L::T_SR_KEY]),
                                   static_cast<uint32_t>(*r.ptr<const float>(L::T_STEP)))
                            : 0;
    {  // the fast loop for what it takes
        const int64_t nf = fused_prefix<STATS>(kind, s, r, pt, st, start, len, scales, ls, side);
        start += nf;
        len -= nf;
    }
    const int64_t end = start + len;
    for (int64_t c0 = start; c0 < end; c0 += CH) {
        const int64_t cn = end - c0 < CH ? end - c0 : CH;
        if (master) {
            fake[L::T_P] = r[L::T_MASTER];
        } else if (pt == F32) {
            fake[L::T_P] = r[L::T_P];
        } else {
            cvt_load(pt, p + c0 * psz, cn, bw);
            fake[L::T_P] = addr_at(bw, c0, 4);
        }
        if (pt != F32) {
            cvt_load(pt, g + c0 * psz, cn, bg);
            fake[L::T_G] = addr_at(bg, c0, 4);
        }
        for (int k = 0; k < 3; k++) {
            const int64_t col = scol[k];
            if (!r[col] || st == F32) continue;  // float32 states in place
            const char* sp = r.ptr<const char>(col) + c0 * ssz;
            if (st == L::STATE_8BIT) {
                const float* q = r.ptr<const float>(qcol[k]) + c0 / L::Q_BLOCK;
                if (k == 0)
                    QCodec<true>::decode(reinterpret_cast<const uint8_t*>(sp), q, cn, bs[k]);
                else
                    QCodec<false>::decode(reinterpret_cast<const uint8_t*>(sp), q, cn, bs[k]);
            } else {
                cvt_load(st, sp, cn, bs[k]);
            }
            fake[col] = addr_at(bs[k], c0, 4);
        }
        block<TF32, STATS>(kind, s, Row{fake}, c0, cn, scales, ls);
        if (master)
            cvt_store(pt, p + c0 * psz, cn, mw + c0);
        else if (sr)
            sr_bf16(bw, cn, reinterpret_cast<uint16_t*>(p) + c0, src,
                    static_cast<uint64_t>(r[L::T_ELEM0] + c0));
        else if (pt != F32)
            cvt_store(pt, p + c0 * psz, cn, bw);
        for (int k = 0; k < 3; k++) {
            const int64_t col = scol[k];
            if (!r[col] || st == F32) continue;
            char* sp = r.ptr<char>(col) + c0 * ssz;
            if (st == L::STATE_8BIT) {
                float* q = r.ptr<float>(qcol[k]) + c0 / L::Q_BLOCK;
                if (k == 0)
                    QCodec<true>::encode(bs[k], cn, reinterpret_cast<uint8_t*>(sp), q);
                else
                    QCodec<false>::encode(bs[k], cn, reinterpret_cast<uint8_t*>(sp), q);
            } else {
                cvt_store(st, sp, cn, bs[k]);
            }
        }
    }
}

// the ALLoRA multiplier of a unit from its sum of squares
inline float unit_scale(double sum, float inv_eta2) {
    return 1.0f / std::sqrt(static_cast<float>(sum) + inv_eta2);
}

// the sums of 16 units of at most W elements each (unit k at p + k * ustride) side by side, one
// float64 lane per unit, in two chains of 8: sum_sq's bits (its lanes then hold one square
// each, exact, and lane_sum adds them in order from +0: here the same additions, element by
// element)
template <class E>
void short_sums16(const typename E::T* __restrict p, int64_t ustride, int64_t ulen,
                  double* out) {
    v8d acc0 = {}, acc1 = {};
    for (int64_t j = 0; j < ulen; j++) {
        alignas(64) double t[16];
        for (int k = 0; k < 16; k++) t[k] = E::ldd(p[k * ustride + j]);
        v8d x0, x1;
        vld(x0, t);
        vld(x1, t + 8);
        acc0 = add_sq_exact(acc0, x0);
        acc1 = add_sq_exact(acc1, x1);
    }
    vst(out, acc0);
    vst(out + 8, acc1);
}

// the ALLoRA sums and multipliers of the units of one block of an in-block tensor: the same
// sum_sq as unit_sums, read just before the update reads the block again from cache. Short
// contiguous units (rows of 8, or of a multiple of 16 up to 256: sum_sq_rows8) 8 at a time,
// other units of at most W elements 16 at a time, and the multipliers after the sums, in a
// vectorised loop of their own: a unit at a time, the scalar chain of 16 lane additions, the
// square root and the division of each row bound a LoRA B matrix's step by their latency (rank
// 16, the B matrices of lora-7b, fp32, 1 thread, Zen 4: the update 25.5 -> 21.7 ms; the
// plain step 13.9 ms). Both side-by-side paths earn their place: short_sums16 alone for every
// row of at most 16 and the rest one unit at a time made ALLoRA B matrices of rank 32 and 64
// 1.08x and 1.065x the step time, rank 16 1.02x; sum_sq_rows8 does not take ranks 4 or 12
template <class E>
void block_units(Row r, const Blk& k, double* usums, float* scales, float inv_eta2) {
    const auto* p = r.ptr<const typename E::T>(L::T_P);
    const int64_t ulen = r[L::T_ULEN], ustride = r[L::T_USTRIDE];
    const int64_t u0 = k.start / ulen, u1 = (k.start + k.len) / ulen;
    int64_t u = u0;
    if constexpr (E::NARROW) {
        if (ustride == ulen && (ulen % W == 0 || ulen == 8) && ulen <= 256)
            for (; u + 8 <= u1; u += 8) sum_sq_rows8<E>(p + u * ulen, ulen, usums + u);
        else if (ulen <= W)
            for (; u + 16 <= u1; u += 16)
                short_sums16<E>(p + u * ustride, ustride, ulen, usums + u);
    }
    for (; u < u1; u++) usums[u] = sum_sq<E>(p + u * ustride, ulen);
    for (u = u0; u < u1; u++) scales[u] = unit_scale(usums[u], inv_eta2);
}

//: elements of a unit updated between two pieces of the next unit's sum (whole quantisation
//: blocks: see unit_pipe)
constexpr int64_t PIPE = 512;
static_assert(PIPE % L::Q_BLOCK == 0 && PIPE % W == 0, "pieces of whole quantisation blocks");
//: the shortest ALLoRA unit whose sum runs beside the update of the unit before it
constexpr int64_t PIPE_MIN = 1024;
//: unit_pipe on (the module's unit_pipe(): off only to compare, the bits are the same); atomic:
//: set with the GIL held while a step of another thread may read it with the GIL released
std::atomic<bool> pipe_on{true};

// The update of unit u of an in-block tensor (weights wr) with the sum of unit u + 1 read beside
// it, PIPE elements of each in turn: the weights of u + 1 come from memory together with the
// g, m, v of u (four streams) instead of alone before them. A unit summed first and then
// updated read that stream alone at about half the bandwidth of four (Llama-1B x0.1 fp32, rows
// of 2048 and 5632, 1 thread, Zen 4: the ALLoRA step 0.92-0.95x the time without this, the
// same optimizer's steps alternated with unit_pipe on and off; 2 threads, GPT-2: no change).
// The sum is SumSq's, in pieces of whole lane groups: the bits of sum_sq. Units of unit_run ==
// ulen only: a piece of the update then starts at a multiple of PIPE from a unit's start, a
// multiple of Q_BLOCK from the tensor's with 8-bit states (ulen % Q_BLOCK == 0 there), and
// the statistics lanes continue from piece to piece (PIPE % W == 0). side_sums:
// the update goes through adam_fused (lowp_block), which takes the piece of the sum into its
// own loop (SideSum; what another loop leaves is summed after it). bf16 ALLoRA rows of
// Llama-1B x0.1, 1 thread, update time against summing each piece after the update's: 0.82x,
// 0.96x, 0.97x and 0.98x in four alternating runs, whole steps within this VM's noise (~7%).
template <class E, class Update>
void unit_pipe(Row wr, int64_t u, double* usums, float* scales, float inv_eta2, bool side_sums,
               Update&& update) {
    const int64_t ulen = wr[L::T_ULEN];
    const auto* wn = wr.ptr<const typename E::T>(L::T_P) + (u + 1) * ulen;
    SumSq<E> acc;
    int64_t done = 0;
    for (int64_t c = 0; c < ulen; c += PIPE) {
        const int64_t take = std::min(PIPE, (ulen - done) / W * W);
        if constexpr (E::NARROW) {
            if (side_sums) {  // adam_fused sums the piece inside its loop (SideSum)
                SideSum side{wn + done, take, 0, acc.a0, acc.a1};
                update(u * ulen + c, std::min(PIPE, ulen - c), &side);
                acc.a0 = side.a0;
                acc.a1 = side.a1;
                acc.add(wn + done + side.done, take - side.done);  // what the loop left
                done += take;
                continue;
            }
        }
        // the piece of the sum requested before the update's piece, read after it from L1
        // (without: the sum's loop waited on its misses, 80% of its cycles)
        prefetch_bytes(wn + done, take * int64_t(sizeof(typename E::T)));
        update(u * ulen + c, std::min(PIPE, ulen - c), nullptr);
        acc.add(wn + done, take);
        done += take;
    }
    usums[u + 1] = acc.finish(wn + done, ulen - done);
    scales[u + 1] = unit_scale(usums[u + 1], inv_eta2);
}

//: the fewest elements of the ALLoRA units an in-block tensor sums and then updates together
constexpr int64_t UNIT_GROUP = 256;

PyObject* py_update(PyObject*, PyObject* args) {
    long long kind, ta, da, n, sa, s64a, usa, ua, sumsa;
    int ready, stats, nt;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLiii", &kind, &ta, &da, &n, &sa, &s64a, &usa, &ua,
                          &sumsa, &ready, &stats, &nt))
        return nullptr;
    auto* scal64 = reinterpret_cast<const double*>(s64a);  // null: none
    auto* tensors = reinterpret_cast<const int64_t*>(ta);
    auto* dtypes = reinterpret_cast<const int64_t*>(da);
    auto* scal = reinterpret_cast<const float*>(sa);
    auto* ustat = reinterpret_cast<double*>(usa);
    auto* uoff = reinterpret_cast<const int64_t*>(ua);
    auto* usums = reinterpret_cast<double*>(sumsa);
    if (!check_dtypes(dtypes, n) || !check_rows(tensors, dtypes, n)) return nullptr;
    if (n == 0) Py_RETURN_NONE;
    if (scal[L::S_ACTIVE] == 0.0f) {  // a skipped step touches nothing and updates nothing:
        if (stats)                     // its update statistics are zero (as the kernels')
            for (int64_t i = 0; i < n * L::US_COLS; i++) ustat[i] = 0.0;
        Py_RETURN_NONE;
    }
    // ALLoRA: unit sums (unless given, summed over ranks), then the multipliers
    int64_t total = 0;
    bool allora = false;
    for (int64_t i = 0; i < n; i++)
        if (uoff[i] >= 0) {
            allora = true;
            const int64_t end = uoff[i] + row(tensors, i)[L::T_NUNITS];
            total = end > total ? end : total;
        }
    // contiguous units of at most a block are summed in the update's blocks (whole units per
    // block): p is read from memory once, not once more by a pass of its own
    std::vector<int64_t> blen(n, 0);
    if (allora && !ready)
        for (int64_t i = 0; i < n; i++)
            if (uoff[i] >= 0) blen[i] = inblock_len(row(tensors, i));
    if (allora && !ready && !unit_sums(tensors, dtypes, n, uoff, usums, nt, blen.data()))
        return nullptr;
    std::vector<float> scales(total + 1);
    for (int64_t i = 0; i < n; i++) {
        if (uoff[i] < 0 || blen[i] > 0) continue;
        const float inv_eta2 = scal[i * L::S_COLS + L::S_INV_ETA2];
        for (int64_t u = 0; u < row(tensors, i)[L::T_NUNITS]; u++) {
            scales[uoff[i] + u] = unit_scale(usums[uoff[i] + u], inv_eta2);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    std::vector<Blk> blocks = flat_blocks(tensors, n, blen.data());
    const int64_t nb = static_cast<int64_t>(blocks.size());
    std::vector<double> part(stats ? 2 * nb + 2 : 2, 0.0);
    const int64_t per = range_blocks(nb, nt), nr = (nb + per - 1) / per;
    // ranges of blocks [lo, hi) taken in turn (range_blocks), each range's blocks one after the
    // other: the sums of an in-block ALLoRA tensor carry from one of its blocks to the next
    // (unit_pipe)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t rg = 0; rg < nr; rg++) {
    const int64_t lo = rg * per, hi = std::min(nb, lo + per);
    int64_t carry = -1;  // the block whose first unit this thread has summed
    for (int64_t b = lo; b < hi; b++) {
        const Blk& k = blocks[b];
        Row r = row(tensors, k.t);
        const int64_t pt = dtypes[k.t], st = state_code(r, pt);
        const Scal s = read_scal(scal + k.t * L::S_COLS,
                                 scal64 ? scal64 + k.t * L::S_COLS : nullptr, kind,
                                 steps_f64(r, pt));
        const float* sc = uoff[k.t] >= 0 ? scales.data() + uoff[k.t] : nullptr;
        // the fast paths: states stored as the parameter, the parameter read and written.
        // bf16 / fp16 Adam without amsgrad goes to lowp_block instead, whose adam_fused converts 16
        // values at a time in registers: the plain path converts chunks of 256 to float32
        // buffers around the float32 loop, three passes through L1 that made one thread of a
        // bf16 AdamW step bound by them (GPT-2 x0.1, Zen 4: 9.96 -> 7.14 ms, 0.72x; ALLoRA rows
        // 0.80x; 2 threads 0.74x). The same operations in the same order: the same bits.
        // float32 Adam too: its fused loop requests its arrays ahead (UPDATE_AHEAD) and
        // divides by the bias correction with one multiply-add chain instead of the divider
        // (div_by16); one process alternating the builds (Xeon model 207, step time against
        // the float32 span loop): AdamW 0.89-0.92x on Llama-1B x0.1 and 0.90x on GPT-2 x0.1 (2
        // threads 0.92x, 0.79x), with clipping 0.87x, ALLoRA rows 0.92-0.93x (ALLoRA spans of
        // a LoRA B matrix's rows of 16 were there before: 0.95x)
        const bool plain = st == pt && r[L::T_MODE] == 0 &&
                           !((pt == BF16 || pt == F16 || pt == F32) && kind == L::KIND_ADAM &&
                             !r[L::T_S3]);
        Lanes ls{};
        Lanes* lsp = stats ? &ls : nullptr;
        // the update of elements [start, start + len) of the block (statistics lanes by index
        // from start: with ranges starting at multiples of 16 the lanes of one call over the
        // block)
        // side: a sum of squares the update loop may take beside it (unit_pipe; adam_fused
        // takes it, the other loops leave it to the caller: side->done)
        auto update = [&](int64_t start, int64_t len, SideSum* side = nullptr) {
            if (!plain) {
                if (stats)
                    lowp_block<true>(kind, s, r, pt, st, start, len, sc, lsp, side);
                else
                    lowp_block<false>(kind, s, r, pt, st, start, len, sc, nullptr, side);
            } else if (stats) {
                switch (pt) {
                    case F32: block<TF32, true>(kind, s, r, start, len, sc, lsp); break;
                    case BF16: block<TBF16, true>(kind, s, r, start, len, sc, lsp); break;
                    case F16: block<TF16, true>(kind, s, r, start, len, sc, lsp); break;
                    default: block<TF64, true>(kind, s, r, start, len, sc, lsp); break;
                }
            } else {
                switch (pt) {
                    case F32: block<TF32, false>(kind, s, r, start, len, sc, nullptr); break;
                    case BF16: block<TBF16, false>(kind, s, r, start, len, sc, nullptr); break;
                    case F16: block<TF16, false>(kind, s, r, start, len, sc, nullptr); break;
                    default: block<TF64, false>(kind, s, r, start, len, sc, nullptr); break;
                }
            }
        };
        if (blen[k.t] > 0) {
            double* us = usums + uoff[k.t];
            float* sw = scales.data() + uoff[k.t];
            const float ie2 = scal[k.t * L::S_COLS + L::S_INV_ETA2];
            int64_t wbuf[L::T_COLS];
            Row wr;
            const int64_t wt = weights(r, pt, wbuf, &wr);
            // a few units summed, then updated while their weights are in L1: summing the
            // whole block first streamed the weights alone, then the rest (one stream ran at
            // about half the bandwidth of four: fp32 ALLoRA rows 1.25x the plain step on GPT-2
            // x0.1, 1 thread, Zen 4; a row at a time: ~1.0x). Runs of at least UNIT_GROUP
            // elements, so that rows of 16 (LoRA B) do not pay an update call each
            const int64_t run = unit_run(r), ulen = r[L::T_ULEN];
            // f(E{}) with E the storage type of the weights (wt)
            auto by_weights = [&](auto&& f) {
                switch (wt) {
                    case F32: f(TF32{}); break;
                    case BF16: f(TBF16{}); break;
                    case F16: f(TF16{}); break;
                    default: f(TF64{}); break;
                }
            };
            auto sums = [&](const Blk& kg) {
                by_weights([&](auto e) { block_units<decltype(e)>(wr, kg, us, sw, ie2); });
            };
            // the update goes through adam_fused (fused_prefix: Adam without amsgrad through
            // lowp_block), which sums the next unit inside its loop
            const bool side_in_loop = !plain && kind == L::KIND_ADAM && !r[L::T_S3];
            if (pipe_on.load(std::memory_order_relaxed) && run == ulen && ulen >= PIPE_MIN) {
                // each unit updated beside the sum of the next (unit_pipe); the chain goes on
                // into the tensor's next block where this thread takes it too
                const int64_t u0 = k.start / ulen, u1 = (k.start + k.len) / ulen;
                const bool more = b + 1 < hi && blocks[b + 1].t == k.t;
                if (carry != b) sums(Blk{k.t, k.start, ulen});
                for (int64_t u = u0; u < u1; u++) {
                    if (u + 1 == u1 && !more) {
                        update(u * ulen, ulen);
                        continue;
                    }
                    by_weights([&](auto e) {
                        unit_pipe<decltype(e)>(wr, u, us, sw, ie2, side_in_loop, update);
                    });
                }
                carry = more ? b + 1 : -1;
            } else {
                const int64_t step = run >= UNIT_GROUP ? run : UNIT_GROUP / run * run;
                const int64_t end = k.start + k.len, wsz = dtype_size(wt);
                const char* wp = wr.ptr<const char>(L::T_P);
                for (int64_t g0 = k.start; g0 < end; g0 += step) {
                    const int64_t gl = std::min(step, end - g0);
                    sums(Blk{k.t, g0, gl});
                    // the next group's weights requested while this group updates (as
                    // unit_pipe's pieces): its sums then read them from L1
                    if (g0 + gl < end)
                        prefetch_bytes(wp + (g0 + gl) * wsz, std::min(step, end - g0 - gl) * wsz);
                    update(g0, gl);
                }
            }
        } else {
            update(k.start, k.len);
        }
        if (stats) {
            part[2 * b] = lane_sum(ls.p0, ls.p1);
            part[2 * b + 1] = lane_sum(ls.u0, ls.u1);
        }
    }  // the blocks of a range
    }  // the ranges
    if (stats) {
        for (int64_t i = 0; i < n; i++) {
            double* us = ustat + i * L::US_COLS;
            us[L::US_PARAM_SQ] = us[L::US_UPDATE_SQ] = 0.0;
        }
        for (int64_t b = 0; b < nb; b++) {
            double* us = ustat + blocks[b].t * L::US_COLS;
            us[L::US_PARAM_SQ] += part[2 * b];
            us[L::US_UPDATE_SQ] += part[2 * b + 1];
        }
        if (kind == L::KIND_ADAM)  // the unscaled update m_hat / (sqrt(v_hat) + eps): u / bc1
            for (int64_t i = 0; i < n; i++) {
                // the float64 update: its bc1
                const bool f64 = scal64 && steps_f64(row(tensors, i), dtypes[i]);
                const double bc1 = f64 ? scal64[i * L::S_COLS + L::S_ADAM_BC1]
                                       : scal[i * L::S_COLS + L::S_ADAM_BC1];
                ustat[i * L::US_COLS + L::US_UPDATE_SQ] /= bc1 * bc1;
            }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// -- the codec and the generator alone (tests: against fastsched.optim._lowp) ------------------

PyObject* py_quantize(PyObject*, PyObject* args) {
    long long xa, n, ca, sa;
    int sgn;
    if (!PyArg_ParseTuple(args, "LLiLL", &xa, &n, &sgn, &ca, &sa)) return nullptr;
    auto* x = reinterpret_cast<const float*>(xa);
    auto* c = reinterpret_cast<uint8_t*>(ca);
    auto* q = reinterpret_cast<float*>(sa);
    Py_BEGIN_ALLOW_THREADS
    if (sgn)
        QCodec<true>::encode(x, n, c, q);
    else
        QCodec<false>::encode(x, n, c, q);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_dequantize(PyObject*, PyObject* args) {
    long long ca, sa, n, oa;
    int sgn;
    if (!PyArg_ParseTuple(args, "LLLiL", &ca, &sa, &n, &sgn, &oa)) return nullptr;
    auto* c = reinterpret_cast<const uint8_t*>(ca);
    auto* q = reinterpret_cast<const float*>(sa);
    auto* out = reinterpret_cast<float*>(oa);
    Py_BEGIN_ALLOW_THREADS
    if (sgn)
        QCodec<true>::decode(c, q, n, out);
    else
        QCodec<false>::decode(c, q, n, out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_sr_round(PyObject*, PyObject* args) {
    long long xa, n, elem0, oa;
    unsigned long long key, step;
    if (!PyArg_ParseTuple(args, "LLKKLL", &xa, &n, &key, &step, &elem0, &oa)) return nullptr;
    auto* x = reinterpret_cast<const float*>(xa);
    auto* out = reinterpret_cast<uint16_t*>(oa);
    const uint32_t c = sr_c(static_cast<uint32_t>(key), static_cast<uint32_t>(step));
    Py_BEGIN_ALLOW_THREADS
    sr_bf16(x, n, out, c, static_cast<uint64_t>(elem0));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// the division of the Adam loop's bias correction (div_by16) over a float32 array, for tests
// against float32 division on the loop's inputs (b in (0, 1]; no overflowing quotient)
PyObject* py_div_by(PyObject*, PyObject* args) {
    long long xa, n, oa;
    float b;
    if (!PyArg_ParseTuple(args, "LfLL", &xa, &b, &n, &oa)) return nullptr;
    if (!(b > 0.0f && b <= 1.0f)) {  // (the bias correction's range: div_by16's inputs)
        PyErr_Format(PyExc_ValueError, "div_by: b must be a float32 in (0, 1], got %g", (double)b);
        return nullptr;
    }
    auto* x = reinterpret_cast<const float*>(xa);
    auto* out = reinterpret_cast<float*>(oa);
    const float y = 1.0f / b;
    for (int64_t i = 0; i < n; i += 16) {
        const int64_t m = n - i < 16 ? n - i : 16;
        alignas(64) float t[16] = {0};
        std::memcpy(t, x + i, 4 * m);
        v16f a;
        vld(a, t);
        a = div_by16(a, b, y);
        vst(t, a);
        std::memcpy(out + i, t, 4 * m);
    }
    Py_RETURN_NONE;
}

PyObject* py_q_top(PyObject*, PyObject*) { return PyFloat_FromDouble(Q_TOP); }

PyObject* py_dtype_codes(PyObject*, PyObject*) {
    return Py_BuildValue("{s:i,s:i,s:i,s:i}", "float32", (int)F32, "bfloat16", (int)BF16,
                         "float16", (int)F16, "float64", (int)F64);
}

PyObject* py_block(PyObject*, PyObject*) { return PyLong_FromLongLong(BLK); }

PyObject* py_layout(PyObject*, PyObject*) {
    PyObject* d = PyDict_New();
    if (!d) return nullptr;
    for (const auto& c : layout::ALL) {
        PyObject* v = PyLong_FromLongLong(c.value);
        if (!v || PyDict_SetItemString(d, c.name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return nullptr;
        }
        Py_DECREF(v);
    }
    return d;
}

// stream ceiling: in place, 4 reads and 3 writes of 32-bit words per element, no arithmetic
PyObject* py_stream(PyObject*, PyObject* args) {
    unsigned long long pa, ga, ma, va;
    long long n;
    int nthreads;
    if (!PyArg_ParseTuple(args, "KKKKLi", &pa, &ga, &ma, &va, &n, &nthreads)) return nullptr;
    auto* p = reinterpret_cast<uint32_t*>(pa);
    auto* g = reinterpret_cast<const uint32_t*>(ga);
    auto* m = reinterpret_cast<uint32_t*>(ma);
    auto* v = reinterpret_cast<uint32_t*>(va);
    Py_BEGIN_ALLOW_THREADS
    // ranges taken in turn as the passes' (range_blocks), so that the ceiling does not wait for
    // a slower thread where the step would not
    const long long chunk = CHUNK_BLOCKS * BLK, nc = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (long long k = 0; k < nc; k++) {
        const long long end = (k + 1) * chunk < n ? (k + 1) * chunk : n;
        for (long long i = k * chunk; i < end; i++) {
            uint32_t a = p[i], b = g[i], c = m[i], d = v[i];
            p[i] = c;
            m[i] = d;
            v[i] = a ^ b;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// the vectors the loops were compiled for (FASTSCHED_CPU_ARCH, default the build machine's)
PyObject* py_simd(PyObject*, PyObject*) {
#if defined(__AVX512F__)
    return PyUnicode_FromString("avx512");
#elif defined(__AVX2__) && defined(__FMA__)
    return PyUnicode_FromString("avx2");
#elif defined(__AVX__)
    return PyUnicode_FromString("avx");
#else
    return PyUnicode_FromString("generic");
#endif
}

// whether the passes run on torch.get_num_threads() threads (else one: a compiler without
// OpenMP, or FASTSCHED_OPENMP=0 at build time)
PyObject* py_openmp(PyObject*, PyObject*) {
#if defined(_OPENMP)
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

// how fp16 values are stored and converted (half_t, setup_ext/kernels.h)
PyObject* py_half(PyObject*, PyObject*) {
#if defined(FS_SOFT_HALF)
    return PyUnicode_FromString("software");
#elif defined(__aarch64__)
    return PyUnicode_FromString("__fp16");
#else
    return PyUnicode_FromString("_Float16");
#endif
}

PyObject* py_unit_pipe(PyObject*, PyObject* args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return nullptr;
    const bool was = pipe_on.exchange(on != 0);
    return PyBool_FromLong(was);
}

PyObject* py_chunk_blocks(PyObject*, PyObject* args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n)) return nullptr;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "chunk_blocks: n must be >= 1 (or 0 to read), got %lld", n);
        return nullptr;
    }
    const int64_t was = n > 0 ? chunk_blocks.exchange(n) : chunk_blocks.load();
    return PyLong_FromLongLong(was);
}

PyMethodDef methods[] = {
    {"layout", py_layout, METH_NOARGS, "The layout constants this module was compiled with."},
    {"dtype_codes", py_dtype_codes, METH_NOARGS, "Storage dtype codes of the dtypes column."},
    {"block", py_block, METH_NOARGS, "Elements per block of the statistics and update passes."},
    {"grad_stats", py_grad_stats, METH_VARARGS,
     "grad_stats(tensors, dtypes, n, tstat, guard, nthreads): the statistics pass."},
    {"finalize", py_finalize, METH_VARARGS,
     "finalize(kind, tensors, n, groups, n_groups, scal, scal64, sched, n_seg, clock, config, "
     "tstat, gstat, lr, history, history_pos, history_len, grad_scale, found_inf, stats, clip, "
     "guard)"},
    {"unit_sums", py_unit_sums, METH_VARARGS,
     "unit_sums(tensors, dtypes, n, uoff, usums, nthreads): ALLoRA sums of squares per unit."},
    {"update", py_update, METH_VARARGS,
     "update(kind, tensors, dtypes, n, scal, scal64, ustat, uoff, usums, sums_ready, stats, "
     "nthreads)"},
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(x, n, signed, codes, scales): float32 x -> 8-bit codes and block scales."},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(codes, scales, n, signed, out): 8-bit codes -> float32."},
    {"sr_round", py_sr_round, METH_VARARGS,
     "sr_round(x, n, key, step, elem0, out): float32 -> bfloat16 by stochastic rounding."},
    {"div_by", py_div_by, METH_VARARGS,
     "div_by(x, b, n, out): float32 x / b, b in (0, 1], as the Adam loop divides by its bias "
     "correction."},
    {"q_top", py_q_top, METH_NOARGS, "The largest code magnitude (layout.Q_TOP)."},
    {"unit_pipe", py_unit_pipe, METH_VARARGS,
     "unit_pipe(on): whether an ALLoRA unit is summed beside the update of the unit before it "
     "(the same bits either way: off only to compare); returns the previous setting."},
    {"chunk_blocks", py_chunk_blocks, METH_VARARGS,
     "chunk_blocks(n): blocks per range that the threads of the statistics and update passes "
     "take in turn (n >= 1; 0 only reads it; the same bits for any value: others only to test "
     "range boundaries); returns the previous setting."},
    {"simd", py_simd, METH_NOARGS,
     "The vector instructions the loops were built for: 'avx512' (64-byte vectors), 'avx2' "
     "(with FMA), 'avx' or 'generic' (16-byte vectors: SSE2, NEON)."},
    {"openmp", py_openmp, METH_NOARGS,
     "Whether the build has OpenMP: the passes then run on torch.get_num_threads() threads, "
     "else on one (the same bits either way)."},
    {"half", py_half, METH_NOARGS,
     "How fp16 values are converted: '_Float16' (the compiler's type: GCC >= 12, clang >= 15 "
     "with F16C on x86-64), '__fp16' (AArch64) or 'software' (16-bit words converted by the extension's "
     "own code: older compilers). Every one gives the same bits; where F16C is there the "
     "16-wide loops convert with it."},
    {"stream", py_stream, METH_VARARGS,
     "stream(p, g, m, v, n, nthreads): bandwidth ceiling, 4 reads + 3 writes per element."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_ext",
                      "Compiled CPU executor of the fastsched fused step.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_ext(void) { return PyModule_Create(&module); }
