//go:build tools

// Package tools pins KWOK, which simulates the GPU nodes' kubelets.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
