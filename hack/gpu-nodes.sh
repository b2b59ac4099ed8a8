#!/usr/bin/env bash
# Prints KWOK-managed Node manifests: gpu-nodes.sh <count> <gpus per node> [name prefix] [product].
# Labels follow NVIDIA GPU feature discovery so selectors written for real clusters work here.
set -euo pipefail
count=$1 gpus=$2 prefix=${3:-gpu-node} product=${4:-NVIDIA-H100-80GB-HBM3}
for i in $(seq 0 $((count - 1))); do
cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: $prefix-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $prefix-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node-role.kubernetes.io/gpu: ""
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: $product
    nvidia.com/gpu.count: "$gpus"
    nvidia.com/gpu.memory: "81559"
    nvidia.com/gpu.family: hopper
    nvidia.com/mig.capable: "true"
spec: {}
status:
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
  capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
  nodeInfo: {architecture: amd64, kubeletVersion: fake, kubeProxyVersion: fake, operatingSystem: linux}
  phase: Running
NODE
done
