package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/tools/remotecommand"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/kubelet/pkg/cri/streaming"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
)

// apiHandler serves the kubelet endpoints the API server proxies to. exec, attach and
// portForward are handed to the CRI streaming server in-process, as kubelet hands them
// to the runtime's streaming server (GetExec/GetAttach/GetPortForward, then proxy).
func (k *kubelet) apiHandler() (http.Handler, error) {
	cfg := streaming.DefaultConfig
	cfg.Addr = "127.0.0.1:0" // never listened on: requests arrive through ServeHTTP
	cfg.BaseURL = &url.URL{Scheme: "https", Host: "localhost", Path: "/cri/"}
	stream, err := streaming.NewServer(cfg, &runtimeAdapter{k: k})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	mux.HandleFunc("/containerLogs/{ns}/{pod}/{container}", k.serveLogs)
	mux.HandleFunc("/exec/{ns}/{pod}/{container}", func(w http.ResponseWriter, r *http.Request) {
		pd := k.lookup(w, r)
		if pd == nil {
			return
		}
		opts, err := remotecommandserver.NewOptions(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		resp, err := stream.GetExec(&runtimeapi.ExecRequest{
			ContainerId: pd.containerID, Cmd: r.URL.Query()["command"],
			Tty: opts.TTY, Stdin: opts.Stdin, Stdout: opts.Stdout, Stderr: opts.Stderr,
		})
		handOff(w, r, stream, resp.GetUrl(), err)
	})
	mux.HandleFunc("/attach/{ns}/{pod}/{container}", func(w http.ResponseWriter, r *http.Request) {
		pd := k.lookup(w, r)
		if pd == nil {
			return
		}
		opts, err := remotecommandserver.NewOptions(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		resp, err := stream.GetAttach(&runtimeapi.AttachRequest{
			ContainerId: pd.containerID,
			Tty:         opts.TTY, Stdin: opts.Stdin, Stdout: opts.Stdout, Stderr: opts.Stderr,
		})
		handOff(w, r, stream, resp.GetUrl(), err)
	})
	mux.HandleFunc("/portForward/{ns}/{pod}", func(w http.ResponseWriter, r *http.Request) {
		pd := k.findPod(r.PathValue("ns"), r.PathValue("pod"))
		if pd == nil {
			http.Error(w, "pod not found on this node", http.StatusNotFound)
			return
		}
		var ports []int32
		for _, p := range r.URL.Query()["port"] {
			v, err := strconv.ParseInt(p, 10, 32)
			if err == nil {
				ports = append(ports, int32(v))
			}
		}
		resp, err := stream.GetPortForward(&runtimeapi.PortForwardRequest{PodSandboxId: string(pd.uid), Port: ports})
		handOff(w, r, stream, resp.GetUrl(), err)
	})
	mux.Handle("/cri/", stream)
	return logRequests(mux), nil
}

func logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.Printf("kubelet API: %s %s from %s", r.Method, r.URL.Path, r.TLS.PeerCertificates[0].Subject.CommonName)
		next.ServeHTTP(w, r)
	})
}

// handOff serves the request on the streaming server's one-time URL, in-process.
func handOff(w http.ResponseWriter, r *http.Request, stream streaming.Server, streamURL string, err error) {
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	u, err := url.Parse(streamURL)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	r2 := r.Clone(r.Context())
	r2.URL.Path = u.Path
	r2.URL.RawPath = ""
	r2.RequestURI = u.Path
	stream.ServeHTTP(w, r2)
}

func (k *kubelet) lookup(w http.ResponseWriter, r *http.Request) *pod {
	pd := k.findPod(r.PathValue("ns"), r.PathValue("pod"))
	if pd == nil || pd.container != r.PathValue("container") {
		http.Error(w, "container not found on this node", http.StatusNotFound)
		return nil
	}
	return pd
}

// serveLogs answers /containerLogs with the container's output (follow, tailLines,
// limitBytes), the way kubelet reads a CRI log file.
func (k *kubelet) serveLogs(w http.ResponseWriter, r *http.Request) {
	pd := k.lookup(w, r)
	if pd == nil {
		return
	}
	q := r.URL.Query()
	follow := q.Get("follow") == "true"
	f, err := os.Open(pd.logPath)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	if tail := q.Get("tailLines"); tail != "" {
		if n, err := strconv.Atoi(tail); err == nil {
			seekTail(f, n)
		}
	}
	var limit int64 = -1
	if lb := q.Get("limitBytes"); lb != "" {
		if n, err := strconv.ParseInt(lb, 10, 64); err == nil {
			limit = n
		}
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32*1024)
	var written int64
	for {
		n, err := f.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			if limit >= 0 && written+int64(n) > limit {
				chunk = chunk[:limit-written]
			}
			if _, werr := w.Write(chunk); werr != nil {
				return
			}
			written += int64(len(chunk))
			if flusher != nil {
				flusher.Flush()
			}
			if limit >= 0 && written >= limit {
				return
			}
		}
		if err == io.EOF {
			if !follow {
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-pd.done:
				// Drain what the container wrote last, then end.
				rest, _ := io.ReadAll(f)
				_, _ = w.Write(rest)
				return
			case <-time.After(100 * time.Millisecond):
			}
		} else if err != nil {
			return
		}
	}
}

func seekTail(f *os.File, lines int) {
	if lines < 0 {
		return
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return
	}
	text := strings.TrimSuffix(string(data), "\n")
	offset := len(data)
	if lines > 0 && len(text) > 0 {
		count := 0
		offset = 0
		for i := len(text) - 1; i >= 0; i-- {
			if text[i] == '\n' {
				count++
				if count == lines {
					offset = i + 1
					break
				}
			}
		}
	}
	_, _ = f.Seek(int64(offset), io.SeekStart)
}

// runtimeAdapter is the "container runtime" behind the streaming server.
type runtimeAdapter struct{ k *kubelet }

// Exec runs cmd inside the container: its network and mount namespaces (nsenter into
// the container's first process) and its cgroup (clone into it), with its environment.
func (a *runtimeAdapter) Exec(ctx context.Context, containerID string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	pd := a.k.findContainer(containerID)
	if pd == nil {
		return fmt.Errorf("container %s not found", containerID)
	}
	if len(cmd) == 0 {
		return fmt.Errorf("no command")
	}
	select {
	case <-pd.done:
		return fmt.Errorf("container %s is not running", containerID)
	default:
	}
	cgroupFD, err := syscall.Open(pd.ctrCgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(cgroupFD)
	args := append([]string{"--target", strconv.Itoa(pd.cmd.Process.Pid), "--net", "--mount", "--wd=/", "--"}, cmd...)
	c := exec.CommandContext(ctx, "nsenter", args...)
	c.Env = pd.env
	if tty {
		return execWithTTY(c, cgroupFD, in, out, resize)
	}
	c.Stdin = in
	if out != nil {
		c.Stdout = out
	}
	if errw != nil {
		c.Stderr = errw
	} else if tty {
		c.Stderr = out
	}
	c.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD}
	err = c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return &exitCodeError{code: ee.ExitCode(), msg: ee.Error()}
	}
	return err
}

// exitCodeError carries the command's exit code to the client (as kubelet's
// utilexec.ExitError does).
type exitCodeError struct {
	code int
	msg  string
}

func (e *exitCodeError) Error() string   { return e.msg }
func (e *exitCodeError) String() string  { return e.msg }
func (e *exitCodeError) Exited() bool    { return true }
func (e *exitCodeError) ExitStatus() int { return e.code }

// Attach streams the container's output from now on and feeds its stdin when the
// container was started with stdin.
func (a *runtimeAdapter) Attach(ctx context.Context, containerID string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	pd := a.k.findContainer(containerID)
	if pd == nil {
		return fmt.Errorf("container %s not found", containerID)
	}
	if in != nil && pd.stdin != nil {
		go func() { _, _ = io.Copy(pd.stdin, in) }()
	}
	f, err := os.Open(pd.logPath)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _ = f.Seek(0, io.SeekEnd)
	reader := bufio.NewReader(f)
	buf := make([]byte, 32*1024)
	for {
		n, rerr := reader.Read(buf)
		if n > 0 && out != nil {
			if _, werr := out.Write(buf[:n]); werr != nil {
				return nil
			}
		}
		if rerr == io.EOF {
			select {
			case <-ctx.Done():
				return nil
			case <-pd.done:
				return nil
			case <-time.After(100 * time.Millisecond):
			}
		} else if rerr != nil {
			return rerr
		}
	}
}

// PortForward connects to the port on the pod's loopback, from inside its network
// namespace: the socket is made on a thread that joined the pod's namespace.
func (a *runtimeAdapter) PortForward(ctx context.Context, podSandboxID string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	a.k.mu.Lock()
	var netnsName string
	for uid, pd := range a.k.pods {
		if string(uid) == podSandboxID {
			netnsName = pd.netns
		}
	}
	a.k.mu.Unlock()
	if netnsName == "" {
		return fmt.Errorf("pod sandbox %s not found", podSandboxID)
	}
	conn, err := dialInNetns("/run/netns/"+netnsName, fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return fmt.Errorf("connecting to port %d in the pod: %w", port, err)
	}
	defer conn.Close()
	errc := make(chan error, 2)
	go func() {
		_, err := io.Copy(conn, stream)
		if tcp, ok := conn.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
		errc <- err
	}()
	go func() {
		_, err := io.Copy(stream, conn)
		errc <- err
	}()
	select {
	case <-ctx.Done():
	case <-errc:
		// One direction ended; give the other a moment to drain.
		select {
		case <-errc:
		case <-time.After(time.Second):
		}
	}
	return nil
}

// dialInNetns dials from a locked OS thread that joined the namespace. The thread is
// never unlocked, so the Go runtime ends it instead of reusing it in the wrong namespace.
func dialInNetns(nsPath, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{nil, err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			ch <- result{nil, err}
			return
		}
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

// execWithTTY runs c on a new pseudo-terminal (kubectl exec -t), forwarding resizes.
func execWithTTY(c *exec.Cmd, cgroupFD int, in io.Reader, out io.WriteCloser, resize <-chan remotecommand.TerminalSize) error {
	c.Env = append(c.Env, "TERM=xterm")
	ptmx, err := pty.StartWithAttrs(c, nil, &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD})
	if err != nil {
		return err
	}
	defer ptmx.Close()
	go func() {
		for size := range resize {
			_ = pty.Setsize(ptmx, &pty.Winsize{Rows: size.Height, Cols: size.Width})
		}
	}()
	if in != nil {
		go func() { _, _ = io.Copy(ptmx, in) }()
	}
	copied := make(chan struct{})
	go func() {
		if out != nil {
			_, _ = io.Copy(out, ptmx)
		}
		close(copied)
	}()
	err = c.Wait()
	select {
	case <-copied:
	case <-time.After(time.Second):
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return &exitCodeError{code: ee.ExitCode(), msg: ee.Error()}
	}
	return err
}
