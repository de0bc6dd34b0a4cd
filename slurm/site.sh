# Your centre's settings: the ONE file to adapt for a cluster. `slurm/submit` reads it when
# it submits a course file, and every job reads it again (through slurm/env.sh), so:
#
#   slurm/submit slurm/train.sbatch                     # submit with these settings
#   slurm/submit --time=02:00:00 slurm/train.sbatch     # sbatch options given here win over this file
#   COURSE_SITE=~/my-site.sh slurm/submit slurm/...     # another copy of this file (the tests do that)
#
# Empty means "the file's own #SBATCH line" (partition and account: the cluster's default).
# Every value can also be set in the submitting shell, e.g. SITE_PARTITION=debug slurm/submit ...
# Plain `sbatch slurm/X.sbatch` works too, with the files' own #SBATCH lines only.

# --- Where and as whom jobs run --------------------------------------------------------------
SITE_PARTITION=${SITE_PARTITION-}        # a partition with GPUs, e.g. gpu
SITE_ACCOUNT=${SITE_ACCOUNT-}            # the project that pays, e.g. project_465000123
SITE_RESERVATION=${SITE_RESERVATION-}    # the workshop's reservation, if the centre made one
SITE_TIME=${SITE_TIME-}                  # wall-time limit of every file, e.g. 00:30:00

# --- What a job gets -------------------------------------------------------------------------
# GPUs: the single-GPU files always use one; the others use this many per node (DataParallel,
# DDP: one process per GPU; the GPU check). The files ask for 2.
SITE_GPUS_PER_NODE=${SITE_GPUS_PER_NODE-}
# CPU cores per GPU, for its DataLoader workers (and the training process's threads). The files
# ask for 8. At most the node's cores divided by its GPUs, or no node can take the job.
SITE_CPUS_PER_GPU=${SITE_CPUS_PER_GPU-}
SITE_MEM_PER_CPU=${SITE_MEM_PER_CPU-}    # host memory per core, e.g. 4G; the files ask for 4G
# Any other sbatch options for every file, separated by spaces, e.g. "--qos=normal --constraint=a100"
SITE_SBATCH_OPTIONS=${SITE_SBATCH_OPTIONS-}

# --- Time limits ------------------------------------------------------------------------------
# How a job that reaches its time limit goes on after its checkpoint:
#   requeue   scontrol requeue: the job keeps its id and run directory (needs --requeue, the default)
#   resubmit  for sites that forbid --requeue: the job submits its own file again, to start when it
#             has ended (--dependency=afterany), with the same run directory (RUN_DIR)
SITE_REQUEUE=${SITE_REQUEUE-requeue}

# --- Node-local disk --------------------------------------------------------------------------
# Empty (the default): every job stages the dataset into its own temporary directory on each node
# and removes it at the end. Sites that allow data to stay on nodes between jobs can name a
# node-local cache instead, e.g. /local/scratch/$USER/course-cache: a later job on that node reuses
# a copy when it is of the same source, and copies again when the source changed.
SITE_NODE_CACHE=${SITE_NODE_CACHE-}

# --- The Python environment -------------------------------------------------------------------
# Empty: the course's .venv when it exists (`make demo` creates it), else the conda environment
# of environment.yml, else the Python on PATH. Or a shell line, e.g.
#   "module load Anaconda3 && conda activate hpc-dl-course"   or   "module load pytorch"
#   ":"   (the Python on PATH, e.g. from a module loaded before)
COURSE_ENV_ACTIVATE=${COURSE_ENV_ACTIVATE-}

# --- The course's image (Apptainer) -----------------------------------------------------------
# Empty: the environment above. Or the path of the image built from container/course.def (on the
# parallel filesystem, readable by the learners), e.g. /project/hpc-dl-course/course.sif: every
# file then runs its python and torchrun inside it (`apptainer exec`, --nv on NVIDIA nodes), with
# the course, the data, the runs and the node-local scratch bound in. docs/containers.md.
COURSE_CONTAINER=${COURSE_CONTAINER-}

# --- Profiling with Nsight Systems ------------------------------------------------------------
# Empty: no profiling. 1: every file's training runs under `nsys profile`, which records a few steps
# (the ones train.py --profile records, with NVTX ranges naming the phases of each step) into
# <run dir>/nsys/<host>-<pid>.nsys-rep; where nsys is missing, one notice and no profile. Usually for
# one job, from the submitting shell: COURSE_NSYS=1 slurm/submit slurm/train.sbatch (docs/performance.md)
COURSE_NSYS=${COURSE_NSYS-}
