"""The layout of every table the host and the kernels share, declared once.

Each name below is used by the Triton kernels (``fastsched.kernels.optim`` and
``fastsched.kernels.schedule`` read them as module attributes, which compiled Triton and the
interpreter both treat as constants), by the table builder (``fastsched.optim._tables``), by the
PyTorch reference (``fastsched.optim._reference``) and by the statistics view
(``fastsched.optim._stats``). A bare column number anywhere else is a bug waiting for a reorder.

This module imports nothing, so the host side can read it without importing Triton.

Tables of one step (``n`` tensors with a gradient, ``G`` parameter groups):

* ``tensors`` int64 ``(n, T_COLS)``: addresses and sizes of each tensor;
* ``blocks`` int64 ``(programs, B_COLS)``: what each program of a multi-tensor launch covers;
* ``groups`` float64 ``(G, G_COLS)``: hyperparameters; the first columns are common to every
  optimizer kind, the rest are per kind (``G_ADAM_*``, ``G_SGD_*``);
* ``scal`` float32 ``(n, S_COLS)``: per-tensor scalars of this step written by the finalize pass
  and read by the update pass; common columns then per-kind ones (``S_ADAM_*``, ``S_SGD_*``);
* statistics: ``partials`` fp32 ``(blocks, PART_COLS)``, ``tstat`` float64 ``(n, TS_COLS)``,
  ``ustat`` ``(n, US_COLS)``, ``gstat`` float64 ``(STAT_COLS,)``, ``history`` float64
  ``(N, H_COLS)``, ``config`` float64 ``(CFG_COLS,)``;
* schedule segments float64 ``(segments, SEG_COLS)`` with the shape codes ``SHAPE_*``.
"""

# -- optimizer kinds (compile-time constant of the finalize and update kernels) -----------------
KIND_ADAM = 0
KIND_SGD = 1

# -- tensors table, int64, one row per tensor ---------------------------------------------------
T_P = 0  # address of the parameter (its local shard under FSDP2 / tensor parallelism)
T_G = 1  # address of the gradient
T_S1 = 2  # exp_avg (Adam) or momentum_buffer (SGD; 0: no momentum)
T_S2 = 3  # exp_avg_sq (Adam; 0 for SGD)
T_S3 = 4  # max_exp_avg_sq (Adam with amsgrad; else 0)
T_STEP = 5  # address of the float32 per-tensor ``step`` state
T_NUMEL = 6
T_GROUP = 7  # parameter-group index (row of the groups table)
T_ULEN = 8  # ALLoRA: unit length (elements of one row, column or the tensor)
T_USTRIDE = 9  # ALLoRA: elements between the starts of two units
T_ESTRIDE = 10  # ALLoRA: elements between two elements of a unit
T_NUNITS = 11  # ALLoRA: number of units (0: not an ALLoRA tensor)
T_MASTER = 12  # address of the float32 master copy (master_weights; else 0)
T_Q1 = 13  # 8-bit states: address of the float32 block scales of T_S1 (else 0)
T_Q2 = 14  # 8-bit states: address of the float32 block scales of T_S2 (else 0)
T_SR_KEY = 15  # stochastic rounding: the tensor's key (sr_key(seed, position), < 2^32)
T_ELEM0 = 16  # stochastic rounding: index in the whole parameter of the local first element
T_SDTYPE = 17  # storage of the states: a STATE_* code
T_MODE = 18  # how the parameter is written: MODE_* bits
T_COLS = 19
#: the state columns, in the order of an optimizer kind's ``state_names``
T_STATES = (T_S1, T_S2, T_S3)

# -- storage of the optimizer states (column T_SDTYPE) ------------------------------------------
STATE_F32 = 0
STATE_BF16 = 1
STATE_F16 = 2
STATE_F64 = 3
STATE_8BIT = 4  # block-scaled 8-bit codes (uint8) + one float32 scale per Q_BLOCK elements

# -- how the parameter is written (column T_MODE, bits) -----------------------------------------
MODE_MASTER = 1  # read / write the float32 master at T_MASTER; the parameter = master rounded
MODE_SR = 2  # store the bf16 parameter with stochastic rounding (see fastsched.optim._lowp)

# -- 8-bit state codes (see fastsched.optim._lowp for the codec, which every executor follows) --
Q_BLOCK = 256  # elements per scale (of the flat local tensor; the last block may be short)
Q_MANT = 3  # mantissa bits of a code's magnitude
Q_BIAS_SIGNED = 15  # exp_avg, momentum_buffer: sign + 4 exponent bits + 3 mantissa bits
Q_BIAS_UNSIGNED = 31  # exp_avg_sq: 5 exponent bits + 3 mantissa bits (no sign)
Q_TOP = 1.875  # the largest magnitude of a code; a block's absmax maps onto it

# -- blocks table, int64, one row per program ---------------------------------------------------
B_TENSOR = 0  # row of the tensors table
B_START = 1  # first element (flat launches) or first unit (ALLoRA launches)
B_COLS = 2

# -- groups table, float64, one row per parameter group -----------------------------------------
G_LR = 0  # the group's base learning rate (the schedule multiplies it)
G_WEIGHT_DECAY = 1
G_MAXIMIZE = 2  # 1.0 or 0.0
G_INV_ETA2 = 3  # ALLoRA 1 / eta^2 (0.0: ALLoRA off)
G_ADAM_BETA1 = 4
G_ADAM_BETA2 = 5
G_ADAM_EPS = 6
G_ADAM_AMSGRAD = 7  # 1.0 or 0.0
G_ADAM_DECOUPLED = 8  # 1.0: AdamW's decoupled decay; 0.0: Adam's L2 penalty
G_SGD_MOMENTUM = 4
G_SGD_DAMPENING = 5
G_SGD_NESTEROV = 6  # 1.0 or 0.0
#: ALLoRA: 1.0 scales each unit's update (its learning rate), 0.0 its gradient
G_ALLORA_UPDATE = 9
G_COLS = 10

# -- per-tensor scalars of a step, float32 ------------------------------------------------------
S_GRAD_MUL = 0  # gradient multiplier: +-1 (maximize) x clip coefficient / grad scale
S_ACTIVE = 1  # 1.0, or 0.0 on a skipped step (the update touches nothing)
S_LR = 2  # the applied learning rate (base x schedule)
S_INV_ETA2 = 3  # ALLoRA 1 / eta^2
S_ADAM_STEP_SIZE = 4  # lr / (1 - beta1^t)
S_ADAM_BC2_SQRT = 5  # sqrt(1 - beta2^t)
S_ADAM_DECAY_MUL = 6  # AdamW: 1 - lr * weight_decay; Adam: 1
S_ADAM_L2 = 7  # Adam: weight_decay (L2 penalty in the gradient); AdamW: 0
S_ADAM_OMB1 = 8  # 1 - beta1, rounded once from float64
S_ADAM_OMB2 = 9  # 1 - beta2, rounded once from float64
S_ADAM_EPS = 10
S_ADAM_BC1 = 11  # 1 - beta1^t (statistics: the unscaled update)
S_SGD_MOM_A = 4  # momentum, 0 on the buffer's first step
S_SGD_MOM_B = 5  # 1 - dampening, 1 on the buffer's first step
S_SGD_WEIGHT_DECAY = 6
S_SGD_NESTEROV = 7
S_SGD_MOMENTUM = 8
S_ALLORA_UPDATE = 12  # 1.0: ALLoRA scales the update; 0.0: the gradient
S_COLS = 13

# -- statistics pass: per-block partial sums, float32 -------------------------------------------
PART_SQ = 0  # sum g^2
PART_ABS = 1  # sum |g|
PART_NONFINITE = 2  # count of NaN / Inf elements
PART_COLS = 4  # 16-byte rows

# -- per-tensor gradient statistics, float64 (reduce pass, then finalize) -----------------------
TS_SQ = 0
TS_ABS = 1
TS_NONFINITE = 2
TS_NORM = 3  # the tensor's unscaled L2 gradient norm (written by finalize)
TS_COLS = 4

# -- per-tensor update statistics (update pass) -------------------------------------------------
US_PARAM_SQ = 0  # sum of the new p^2
US_UPDATE_SQ = 1  # sum of u^2, u the unscaled update (Adam: m_hat / (sqrt(v_hat) + eps))
US_COLS = 2

# -- global statistics of the last step, float64 ------------------------------------------------
STAT_GRAD_NORM = 0  # global L2 of the unscaled gradients, before clipping
STAT_GRAD_NORM_L1 = 1
STAT_CLIP_COEF = 2
STAT_SKIPPED = 3  # 1.0 if the step was skipped
STAT_SKIP_COUNT = 4
STAT_NONFINITE = 5  # non-finite gradient elements
STAT_LR0 = 6  # applied lr of group 0
STAT_INV_SCALE = 7  # 1 / grad scale
STAT_COLS = 8

# -- ring buffer of the last N steps, float64 ---------------------------------------------------
H_STEP = 0  # the clock value of the step
H_GRAD_NORM = 1
H_LR = 2  # applied lr of group 0
H_SKIPPED = 3
H_GRAD_NORM_L1 = 4
H_COLS = 5

# -- options the finalize pass reads from device memory, float64 --------------------------------
CFG_MAX_GRAD_NORM = 0  # 0.0 when clipping is off
CFG_COLS = 2

# -- schedule segment tables, float64 (see fastsched.schedules._core) ---------------------------
SEG_START = 0
SEG_LENGTH = 1
SEG_SHAPE = 2
SEG_V0 = 3
SEG_V1 = 4
SEG_A = 5
SEG_B = 6
SEG_C = 7
SEG_COLS = 8
SEG_NAMES = ("start", "length", "shape", "v0", "v1", "a", "b", "c")

# shape codes stored in column SEG_SHAPE (``fastsched.schedules.Shape`` is built from these)
SHAPE_CONST = 0
SHAPE_LINEAR = 1
SHAPE_COSINE = 2
SHAPE_POLY = 3
SHAPE_POW_DECAY = 4
SHAPE_GEOMETRIC = 5
SHAPE_EXP_RATE = 6
SHAPE_INV_SQRT = 7
SHAPE_REX = 8
SHAPE_POWER = 9
SHAPE_INV_SQRT_CD = 10
SHAPES = {name[len("SHAPE_"):]: value for name, value in dict(globals()).items()
          if name.startswith("SHAPE_") and name != "SHAPES"}
