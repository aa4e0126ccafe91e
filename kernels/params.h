/*
 * The one definition of what a kernel launch receives. nvcc compiles it into the kernels;
 * build.rs runs bindgen on it to produce the Rust structs, so the two sides cannot drift.
 * Plain C: pointers are device addresses; every kernel takes one of these structs by value.
 */
#ifndef FWL_PARAMS_H
#define FWL_PARAMS_H

#include <stdint.h>

/* Threads per block of every kernel. */
#define FWL_THREADS 1024

/* Keywords travel inside the launch parameters (no upload, no host sync). */
#define FWL_MAX_KEYWORDS 64

/* RowMean */
#define FWL_ROW_MEAN_ALL 0
#define FWL_ROW_MEAN_VALID 1

/* Reduction */
#define FWL_REDUCE_MEAN 0
#define FWL_REDUCE_WEIGHTED_MEAN 1
#define FWL_REDUCE_SUM 2

/* FwlStatus.flags */
#define FWL_STATUS_BAD_ID 1u
#define FWL_STATUS_BAD_LABEL 2u
#define FWL_STATUS_NON_FINITE 4u
#define FWL_STATUS_BAD_TOKEN_WEIGHT 8u
#define FWL_STATUS_BAD_SAMPLE_WEIGHT 16u  /* alpha * (1 + hits), or their sum, not finite */

/* What the kernels found that the host reports as errors when it reads the results. Indexes
 * are flat `b * T + t`; -1 when nothing was found. */
typedef struct FwlStatus {
    uint32_t flags;
    uint32_t reserved;
    int64_t bad_id_index;
    int64_t bad_id_value;
    int64_t bad_label_index;
    int64_t bad_label_value;
    int64_t non_finite_row;
    int64_t bad_weight_index;
    float bad_weight_value;
    uint32_t reserved2;
    double bad_sample_weight; /* the first non-finite sample weight, else the weighted mean's sum */
} FwlStatus;

/* Plan kernel (one block): validates the tokens, works out targets, weights and per-sample
 * gradient coefficients. */
typedef struct FwlPlanParams {
    const void *ids;          /* [B*T] int32, int64 or uint32 (by kernel) */
    const void *labels;       /* [B*T] same type, or NULL: the ids */
    int64_t batch;
    int64_t seq;
    int64_t vocab;
    int64_t ignore_index;
    int32_t row_mean;         /* FWL_ROW_MEAN_* */
    int32_t reduction;        /* FWL_REDUCE_* */
    int32_t num_keywords;
    int32_t reserved;
    int64_t keyword_ids[FWL_MAX_KEYWORDS];
    double keyword_weights[FWL_MAX_KEYWORDS];
    double alpha;
    double grad_scale;            /* used when grad_scale_ptr is NULL */
    const float *grad_scale_ptr;  /* device scalar (upstream gradient), or NULL */
    const float *token_weights;   /* [B*T] per-token weights (checked finite), or NULL */
    int32_t *targets;         /* out [B*T]: target id, or -1 for none */
    double *weights;          /* out [B] */
    uint32_t *valid;          /* out [B] non-ignored targets */
    double *row_div;          /* out [B] divisor of the sum of per-token losses (0: none) */
    double *reduce;           /* out [B] d loss / d loss_b */
    float *coef;              /* out [B] grad_scale * reduce / row_div */
    FwlStatus *status;        /* out */
} FwlPlanParams;

/* Rows kernel (grid-stride over rows): statistics, loss and gradient of each logits row. */
typedef struct FwlRowParams {
    const void *logits;       /* [rows * vocab] */
    void *grad;               /* [rows * vocab], NULL for loss only; may equal logits (in place) */
    const int32_t *targets;   /* [row_offset + rows] */
    const float *coef;        /* [(row_offset + rows) / seq] */
    const float *token_weights; /* [row_offset + rows]: row r is weighted by token_weights[r + 1]; or NULL */
    double *row_loss;         /* out [row_offset + rows], in double so that finite logits give a finite loss */
    double *row_z;            /* out [row_offset + rows]: the z-loss part of each row's loss, or NULL */
    int64_t rows;
    int64_t seq;
    int64_t vocab;
    int64_t smem_vectors;     /* 16-byte vectors of a row kept in dynamic shared memory */
    int32_t vector_stores;    /* 1 when grad and logits share their alignment mod 16 */
    float softcap;            /* c of c * tanh(z / c), or 0: off */
    double z_loss;            /* z-loss coefficient (0: off) */
    double smoothing;         /* label smoothing epsilon (0: off) */
    int64_t row_offset;       /* the plan's row of logits row 0: targets, coef, token weights and the
                                 row outputs are indexed by row_offset + row (0 for a whole call) */
} FwlRowParams;

/* Finish kernel (one block): per-sample means and the batch loss, in a fixed order. */
typedef struct FwlFinishParams {
    const double *row_loss;   /* [B*T] */
    const double *row_z;      /* [B*T] z-loss parts, or NULL */
    const float *token_weights; /* [B*T] as in FwlRowParams, or NULL */
    const int32_t *targets;   /* [B*T] */
    const double *row_div;    /* [B] */
    const double *reduce;     /* [B] */
    double *per_sample;       /* out [B] */
    double *per_sample_z;     /* out [B] (with row_z) */
    double *loss;             /* out [1] */
    double *z_loss;           /* out [1]: the z-loss part of the loss (0 without row_z) */
    float *loss_f32;          /* out [1], the same rounded to f32 (for frameworks' f32 scalars) */
    FwlStatus *status;        /* out: non_finite_row */
    int64_t batch;
    int64_t seq;
} FwlFinishParams;

/* Scale kernel: grad *= *scale (an upstream gradient on the device); returns at once when the
 * scale is exactly 1, so the common case costs no pass over the gradient. */
typedef struct FwlScaleParams {
    void *grad;               /* [n] */
    const float *scale;       /* [1] */
    int64_t n;
} FwlScaleParams;

/* Narrow kernel: dst[i] = src[i] rounded to the destination's 16-bit type (the tiled fused
 * linear path's f32 `d hidden` accumulator into the caller's buffer). */
typedef struct FwlNarrowParams {
    const float *src;         /* [n] */
    void *dst;                /* [n] */
    int64_t n;
} FwlNarrowParams;

/* The vocabulary- and data-parallel split's kernels (kernels/split.cuh). */
#include "split_params.h"

#endif
