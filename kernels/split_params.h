/*
 * Launch parameters of the vocabulary- and data-parallel split (kernels/split.cuh), included by
 * params.h (so bindgen sees them too). A rank holds columns [v0, v0 + len) of every row of the
 * vocabulary; the plan kernel's targets are ids of the whole vocabulary.
 */
#ifndef FWL_SPLIT_PARAMS_H
#define FWL_SPLIT_PARAMS_H

#include <stdint.h>

/* Floats of one row's statistics in the exchange: max, sum of exp(z - max) (without the
 * target's term, in the slice that holds it), raw target logit (0 outside the slice), and with label smoothing the sum of (z - max) of the (capped) logits
 * and the slice's length (to move that sum to the row's maximum when the slices merge). */
#define FWL_SPLIT_WORDS 3
#define FWL_SPLIT_WORDS_SMOOTHING 5

/* Statistics kernel (grid-stride over rows, one block per row). */
typedef struct FwlSplitStatsParams {
    const void *logits;       /* [rows * len]: the chunk's rows, this rank's columns */
    const int32_t *targets;   /* [plan rows]: target ids in the whole vocabulary, -1 for none */
    float *partials;          /* out [rows * words] */
    int64_t rows;             /* rows of the chunk */
    int64_t row0;             /* plan row of the chunk's first row */
    int64_t len;
    int64_t v0;
    int32_t words;            /* FWL_SPLIT_WORDS or FWL_SPLIT_WORDS_SMOOTHING */
    float softcap;            /* c of c * tanh(z / c), or 0: off */
    int32_t fold;             /* 1: merge this slice's statistics into what partials holds (the
                                 previous slices' merged, in order) instead of writing them: the
                                 tiled fused linear path's vocabulary blocks, whose gradient
                                 kernels then see one "rank" with the same bits as the gathered
                                 merge of all of them */
} FwlSplitStatsParams;

/* Gradient kernel (grid-stride over rows, one block per row): merges every rank's statistics of
 * the row in rank order, writes the row's loss and the gradient of this rank's columns. */
typedef struct FwlSplitGradParams {
    const void *logits;       /* [rows * len] */
    void *grad;               /* [rows * len], NULL for loss only; may equal logits (in place) */
    const float *gathered;    /* [ranks * rows * words]: rank r's partials at r * rows * words */
    const int32_t *targets;   /* [plan rows] */
    const float *coef;        /* [B] */
    const float *token_weights; /* [plan rows]: row r is weighted by token_weights[r + 1]; or NULL */
    double *row_loss;         /* out [plan rows] */
    double *row_z;            /* out [plan rows]: z-loss parts, or NULL */
    int64_t rows;
    int64_t row0;
    int64_t seq;
    int64_t len;
    int64_t v0;
    int64_t vocab;            /* the whole vocabulary (label smoothing divides by it) */
    int32_t ranks;
    int32_t words;
    int32_t vector_stores;    /* 1 when grad and logits share their alignment mod 16 */
    float softcap;
    double z_loss;
    double smoothing;
} FwlSplitGradParams;

/* Batch kernel (one block). Mode FWL_SPLIT_TOTALS: totals = [B, sum of weights]. Mode
 * FWL_SPLIT_DENOMINATOR: from the data group's gathered totals ([ranks * 2], summed in rank
 * order), reduce and coef as the plan kernel computes them with that denominator; under the
 * weighted mean, a group's sum of weights beyond double (each rank's finite) is reported in
 * status as the plan kernel reports its own (FWL_STATUS_BAD_SAMPLE_WEIGHT). Mode
 * FWL_SPLIT_LOSS: loss, z_loss and loss_f32 = the rank-order sums of gathered [ranks * 2] shares. */
#define FWL_SPLIT_TOTALS 0
#define FWL_SPLIT_DENOMINATOR 1
#define FWL_SPLIT_LOSS 2

typedef struct FwlSplitBatchParams {
    const double *weights;    /* [B] */
    const double *row_div;    /* [B] */
    double *totals;           /* out [2] (totals) */
    const double *gathered;   /* [ranks * 2] (denominator, loss) */
    double *reduce;           /* out [B] (denominator) */
    float *coef;              /* out [B] (denominator) */
    double *loss;             /* out [1] (loss) */
    double *z_loss;           /* out [1] (loss) */
    float *loss_f32;          /* out [1] (loss) */
    const float *grad_scale_ptr; /* device upstream gradient, or NULL: grad_scale */
    FwlStatus *status;        /* in/out [1] (denominator): the plan's status, or NULL */
    double grad_scale;
    int64_t batch;
    int32_t ranks;
    int32_t reduction;        /* FWL_REDUCE_* */
    int32_t mode;
    int32_t reserved;
} FwlSplitBatchParams;

#endif
