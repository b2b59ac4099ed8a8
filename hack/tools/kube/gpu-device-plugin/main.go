// Command gpu-device-plugin advertises simulated NVIDIA GPUs (nvidia.com/gpu) to a real kubelet
// through the device-plugin API, so the kubelet allocates them to pods and reports the
// allocation in its pod-resources API, as it would for NVIDIA's plugin. Device IDs are the UUIDs
// edpilot's simulated backend gives the node's GPUs, so a simulated agent and the kubelet agree.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

const resourceName = "nvidia.com/gpu"

// gpuUUID mirrors edpilot.gpusim.gpu_uuid: GPU-<sha256("node/index") split 8-4-4-4-12>.
func gpuUUID(node string, index int) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%d", node, index)))
	h := hex.EncodeToString(sum[:])
	return fmt.Sprintf("GPU-%s-%s-%s-%s-%s", h[:8], h[8:12], h[12:16], h[16:20], h[20:32])
}

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done() // the devices never change
	return nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		env := map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")}
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{Envs: env})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func register(kubeletSocket, endpoint string) error {
	conn, err := grpc.NewClient("unix://"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resourceName,
	})
	return err
}

func main() {
	dir := flag.String("plugin-dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin directory")
	node := flag.String("node-name", "", "the node's name (device IDs derive from it)")
	gpus := flag.Int("gpus", 8, "GPUs to advertise")
	flag.Parse()
	if *node == "" {
		log.Fatal("--node-name is required")
	}
	p := &plugin{}
	for i := 0; i < *gpus; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: gpuUUID(*node, i), Health: pluginapi.Healthy})
	}
	endpoint := "edpilot-gpu.sock"
	path := filepath.Join(*dir, endpoint)
	_ = os.Remove(path)
	listener, err := net.Listen("unix", path)
	if err != nil {
		log.Fatalf("listen on %s: %v", path, err)
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() { _ = server.Serve(listener) }()
	// The kubelet may still be starting: its registration socket answers within a minute.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		if err = register(filepath.Join(*dir, "kubelet.sock"), endpoint); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		log.Fatalf("register with the kubelet: %v", err)
	}
	log.Printf("advertising %d %s devices of node %s", *gpus, resourceName, *node)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	server.Stop()
}
