#!/usr/bin/env bash
# Submit a training job that survives SLURM time limits and preemption (docs/resilience.md).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [TIME=24:00:00] [SIGNAL_SECONDS=300] [SRUN_ARGS=...] \
#   tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py arguments ...]
#
# The job is submitted with sbatch --signal=B:USR1@SIGNAL_SECONDS --requeue --open-mode=append. Its batch
# shell runs `srun $PYTHON -u tools/train.py CONFIG --work-dir WORK_DIR --launcher slurm --resume` in the
# background and forwards USR1 to the srun step (B: signals only the batch shell, and bash runs a trap only
# once its foreground child exits). srun passes it to every task; the PreemptionHook checkpoints at the
# next iteration boundary all ranks agree on, runs `scontrol requeue`, and the requeued job (same id,
# SLURM_RESTART_COUNT+1, same WORK_DIR and log) resumes from that checkpoint.
#
# Other environment: GRES (default gpu:$GPUS_PER_NODE; empty for CPU-only clusters), PYTHON (default: the
# project's venv, ${VIM_DISC_VENV:-<repo>/.venv}/bin/python, when it exists, else python), LAUNCHER (default
# slurm; `none` runs a single task without torch.distributed), SBATCH_ARGS (extra sbatch options). Prints the
# job id.
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,5p' "$0" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4

GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
TIME=${TIME:-24:00:00}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300}
SRUN_ARGS=${SRUN_ARGS:-}
SBATCH_ARGS=${SBATCH_ARGS:-}
GRES=${GRES-gpu:${GPUS_PER_NODE}}
LAUNCHER=${LAUNCHER:-slurm}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the venv scripts/setup_env.sh builds holds mmdet & co.; a bare `python` on the nodes usually does not
VENV_PY=${VIM_DISC_VENV:-$ROOT/.venv}/bin/python
[ -x "$VENV_PY" ] || VENV_PY=python
PYTHON=${PYTHON:-$VENV_PY}
NODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
TASKS_PER_NODE=$(( GPUS < GPUS_PER_NODE ? GPUS : GPUS_PER_NODE ))
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)  # the same absolute work dir on every restart

# the python command line, quoted once here so the job script sees exactly these words
TRAIN=$(printf '%q ' "$PYTHON" -u tools/train.py "$CONFIG" --work-dir "$WORK_DIR" --launcher "$LAUNCHER" --resume "$@")

# shellcheck disable=SC2086  # SBATCH_ARGS / SRUN_ARGS are option lists on purpose
sbatch --parsable \
  --partition="$PARTITION" --job-name="$JOB_NAME" \
  --nodes="$NODES" --ntasks="$GPUS" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
  ${GRES:+--gres="$GRES"} --time="$TIME" \
  --signal=B:USR1@"$SIGNAL_SECONDS" --requeue --open-mode=append --output="$WORK_DIR/slurm-%j.out" \
  $SBATCH_ARGS <<EOF
#!/usr/bin/env bash
cd $(printf '%q' "$ROOT")
echo "[slurm_train] job \$SLURM_JOB_ID start \$(date -u +%FT%TZ) SLURM_RESTART_COUNT=\${SLURM_RESTART_COUNT:-0} nodes \$SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 $SRUN_ARGS $TRAIN &
SRUN_PID=\$!
forward() {
  echo "[slurm_train] USR1 at \$(date -u +%FT%TZ): forwarding to the training step"
  kill -USR1 "\$SRUN_PID" 2>/dev/null || true
}
trap forward USR1
# a trapped signal interrupts wait (status > 128 while srun still runs): wait again
while true; do
  wait "\$SRUN_PID"
  rc=\$?
  if [ \$rc -gt 128 ] && kill -0 "\$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
echo "[slurm_train] training step exited (\$rc) at \$(date -u +%FT%TZ)"
exit \$rc
EOF
