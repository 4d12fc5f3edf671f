"""LD3: learning the time discretisation of a sampler from a few teacher samples.

Tong, Hoang, Liu, Van den Broeck, Niepert, "Learning to Discretize Denoising Diffusion ODEs" (ICLR 2025,
arXiv 2405.15506); reference code vinhsuhi/LD3. See docs/ld3.md. The command line is ld3.py (also
`python -m samplers.ld3`).

1. Teacher data (teacher.py, `generate_teacher`): unit-variance noises drawn per seed exactly as generate.py draws
   them, the teacher's samples by generate.py's own per-batch path (default UniPC-3 bh1, 20 NFE on EDM's rho = 7
   grid, as LD3's CIFAR-10 recipe) and the class labels.
2. Student grid (grid.py, `GridParameterization`): sigma_k = exp(u_k) with u = log sigma running from log sigma_max
   to log sigma_min by a softmax-cumsum of one logit per step (LD3's `time_mode: lambda`), so the grid is strictly
   decreasing and hits both ends by construction. A second vector moves the interior levels at which the denoiser
   is evaluated (LD3's decoupled evaluation grid, used by the solvers as `eval_sigmas`).
3. Objective and optimisation (optimize.py, `train_ld3`): a distance (DISTANCES: LPIPS, L2 or L1) between the
   student's sample and the teacher's, where the student may start from any noise within a ball of radius
   r = 0.001 C H W / NFE^2 (unit-noise scale) around the teacher's (LD3's soft objective; r = 0 is the hard one);
   RMSprop on the logits, SGD on the evaluation offsets and the noises, 2 + 5 rounds, model selection on a validation
   split after every step, patience with learning-rate decay (the student: student.py, `student_sample`).
4. Safeguards (selection.py; on by default, `guard=False, init='logsnr', num_holdout=0` is LD3 as published): the
   hand-made grids (grid.HAND_MADE_GRIDS) are scored first and LD3 starts from the best; teacher samples after the
   validation split are held out; the learned grid is returned only when it beats the best hand-made grid on
   validation and on the held-out samples (a gain within two paired standard errors is warned about), otherwise
   that hand-made grid is. The result is written as a schedule file (samplers.save_schedule_file) that generate.py
   --schedule uses with the same solver; its provenance records the start, every validation loss and the splits,
   and `evaluate_schedule` (ld3.py evaluate) compares it with the hand-made grids on teacher samples it never saw.

Differences from the reference code, on purpose:
- The student is the registered solver itself, differentiated through (its coefficients are tensor operations):
  every solver and option of generate.py works, and NFE is counted honestly.
- The evaluation offsets are clipped to a fraction `eval_window` (< 0.5) of each level's neighbouring gaps in
  log sigma, so the evaluation grid stays strictly decreasing; LD3 clips to 0.5 x the smallest gap between raw
  logits, which keeps the offsets inert until the logits separate.
- Each step keeps at least `MIN_STEP_FRACTION` of the log-sigma range, so extreme logits (a softmax that
  underflows) still give a strictly decreasing grid.
"""

from samplers.ld3.grid import (
    HAND_MADE_GRIDS,
    MIN_STEP_FRACTION,
    GridParameterization,
    hand_made_grid_names,
    hand_made_levels,
    steps_for_nfe,
)
from samplers.ld3.optimize import DISTANCES, LD3Config, LD3Result, l1_distance, l2_distance, make_distance, train_ld3
from samplers.ld3.selection import (
    NOISE_SE,
    TIE_TOLERANCE,
    Evaluation,
    GridScore,
    TeacherSplit,
    choose_result,
    evaluate_schedule,
    paired_gain,
    score_grid,
)
from samplers.ld3.student import check_deterministic, student_sample
from samplers.ld3.teacher import (
    TEACHER_FILE_FORMAT,
    TEACHER_FILE_VERSION,
    TEACHER_STEPS,
    TeacherData,
    generate_teacher,
    load_teacher_data,
    save_teacher_data,
    teacher_differences,
    teacher_plan,
    teacher_samples,
)

__all__ = [
    "DISTANCES", "HAND_MADE_GRIDS", "MIN_STEP_FRACTION", "NOISE_SE", "TEACHER_FILE_FORMAT", "TEACHER_FILE_VERSION",
    "TEACHER_STEPS", "TIE_TOLERANCE", "Evaluation", "GridParameterization", "GridScore", "LD3Config", "LD3Result",
    "TeacherData", "TeacherSplit", "check_deterministic", "choose_result", "evaluate_schedule", "generate_teacher",
    "hand_made_grid_names", "hand_made_levels", "l1_distance", "l2_distance", "load_teacher_data", "make_distance",
    "paired_gain", "save_teacher_data", "score_grid", "steps_for_nfe", "student_sample", "teacher_differences",
    "teacher_plan", "teacher_samples", "train_ld3",
]
