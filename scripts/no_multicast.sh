#!/usr/bin/env bash
# Sourced by every script that launches model processes (eval tables, benchmarks, the default job): NVLink
# multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM. On shared multi-GPU hosts a program that
# uses it can put the host's GPUs out of service; the values are forced, never left to the caller's
# environment. llava.placement.NO_MULTICAST holds the same three (the bench sets them in-process too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
