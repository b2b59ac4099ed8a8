//go:build tools

// Package tools pins the helm CLI used to install the chart in tests.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
