#!/usr/bin/env bash
# Issue 23's GPU measurement in ONE call of at most 8 minutes (and issue 24's TensorRT row, measured only where
# requirements/gpu.txt is installed, else each trt row says which torch served and why): the steps are the
# PLAN=issue23 part of gpu_session.sh, each time-boxed, writing JSON and session.log under $OUT
# (default bench/gpu/results). GPU_TESTS=1 SESSION_S=560 adds the CUDA tests (90 s, past the 8 minutes) before the
# TensorRT row.
#   bash bench/gpu/run.sh                      # on the GPU machine, from the repo root
#   DEVICE=cpu bash bench/gpu/run.sh           # the same plumbing on CPU, small (a dry run)
exec env PLAN=issue23 SESSION_S="${SESSION_S:-470}" bash "$(dirname "$0")/gpu_session.sh" "$@"
