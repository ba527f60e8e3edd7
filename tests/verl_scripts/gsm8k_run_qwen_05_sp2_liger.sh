# Copy of veRL's examples/sft/gsm8k/run_qwen_05_sp2_liger.sh (volcengine/verl b178a3cd5), run by tests/test_verl.py.
# Changed: the entry point (torchrun -m verl.trainer.* -> python -m jsft.train) and the model path
# (under $HOME/models); run_sft_engine.sh also passes "$@" (sizes appended by the test).
set -x

if [ "$#" -lt 2 ]; then
    echo "Usage: run_qwen_05_sp2.sh <nproc_per_node> <save_path> [other_configs...]"
    exit 1
fi

nproc_per_node=$1
save_path=$2

# Shift the arguments so $@ refers to the rest
shift 2

python -m jsft.train \
    data.train_files=$HOME/data/gsm8k/train.parquet \
    data.val_files=$HOME/data/gsm8k/test.parquet \
    data.prompt_key=extra_info \
    data.response_key=extra_info \
    optim.lr=1e-4 \
    data.prompt_dict_keys=['question'] \
    +data.response_dict_keys=['answer'] \
    data.micro_batch_size=4 \
    model.partial_pretrain=$HOME/models/Qwen/Qwen2.5-0.5B-Instruct \
    model.use_liger=True \
    trainer.default_local_dir=$save_path \
    trainer.project_name=gsm8k-sft \
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct-sp2-liger \
    trainer.logger=console $@ \
    ulysses_sequence_parallel_size=2 \
    use_remove_padding=true
