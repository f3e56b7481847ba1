#!/usr/bin/env bash
# Started by DeepSpeed's launcher on each node: Lightning reads the node rank from NODE_RANK.
export NODE_RANK="${NODE_RANK:-${CROSS_RANK:-0}}"
exec "$@"
