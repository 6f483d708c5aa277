"""Tiny network helper run inside the test's network namespaces.

  fw_peer.py serve OUTFILE            listen on TCP 22/80/8080 (v4+v6) and on
                                      UDP 5353 (joined to 224.0.0.251 and ff02::fb
                                      on every interface); log UDP payloads to OUTFILE
  fw_peer.py tcp HOST PORT            exit 0 connected, 2 refused, 3 timed out
  fw_peer.py mcast4 SRCADDR MSG       send MSG to 224.0.0.251:5353 from SRCADDR
  fw_peer.py mcast6 IFNAME MSG        send MSG to [ff02::fb%IFNAME]:5353
  fw_peer.py udp HOST PORT MSG        send a unicast datagram
"""
import os
import select
import socket
import struct
import sys
import time


def serve(out):
    socks = []
    for port in (22, 80, 8080):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(16)
        socks.append(s)
    u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u4.bind(("0.0.0.0", 5353))
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u6.bind(("::", 5353))
    for idx, name in socket.if_nameindex():
        if name == "lo":
            continue
        u4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                      struct.pack("4s4si", socket.inet_aton("224.0.0.251"), socket.inet_aton("0.0.0.0"), idx))
        u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                      socket.inet_pton(socket.AF_INET6, "ff02::fb") + struct.pack("@I", idx))
    socks += [u4, u6]
    with open(out, "a") as f:
        f.write("ready\n")
        f.flush()
        while True:
            r, _, _ = select.select(socks, [], [], 1.0)
            for s in r:
                if s.type == socket.SOCK_STREAM:
                    c, _ = s.accept()
                    c.close()
                else:
                    data, _ = s.recvfrom(2048)
                    f.write(data.decode(errors="replace") + "\n")
                    f.flush()


def tcp(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1.5)
    try:
        s.connect((host, int(port)))
        return 0
    except ConnectionRefusedError:
        return 2
    except (socket.timeout, TimeoutError):
        return 3
    except OSError as e:
        print(e, file=sys.stderr)
        return 4


def main():
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2])
    elif cmd == "tcp":
        sys.exit(tcp(sys.argv[2], sys.argv[3]))
    elif cmd == "mcast4":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[2]))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        s.sendto(sys.argv[3].encode(), ("224.0.0.251", 5353))
    elif cmd == "mcast6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        idx = socket.if_nametoindex(sys.argv[2])
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.sendto(sys.argv[3].encode(), ("ff02::fb", 5353, 0, idx))
    elif cmd == "udp":
        fam = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
