// nsforward: listens on a loopback address in the current (root) network namespace and
// forwards each connection to an address inside a named network namespace, dialing from
// a thread that joined it. This is how the machine reaches the test control plane
// without ever sending a packet to a topology address from the root namespace.
package main

import (
	"flag"
	"io"
	"log"
	"net"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:16443", "loopback address to listen on")
	netns := flag.String("netns", "", "path of the target network namespace (/run/netns/NAME)")
	target := flag.String("to", "", "address to connect to inside that namespace")
	flag.Parse()
	host, _, err := net.SplitHostPort(*listen)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		log.Fatalf("--listen must be a loopback address, got %q", *listen)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	log.Printf("forwarding %s -> %s in %s", *listen, *target, *netns)
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Printf("accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go forward(c, *netns, *target)
	}
}

func forward(c net.Conn, nsPath, target string) {
	defer c.Close()
	up, err := dialInNetns(nsPath, target)
	if err != nil {
		log.Printf("dial %s in %s: %v", target, nsPath, err)
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(up, c)
		_ = up.(*net.TCPConn).CloseWrite()
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(c, up)
		_ = c.(*net.TCPConn).CloseWrite()
		done <- struct{}{}
	}()
	<-done
	<-done
}

// dialInNetns dials from a locked OS thread that joined the namespace; the thread is
// never unlocked, so the runtime retires it instead of reusing it.
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
