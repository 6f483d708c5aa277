"""Tiny network helper run inside the test's network namespaces.

  fw_peer.py serve OUTFILE            listen on TCP 22/80/8080 (v4+v6) and on
                                      UDP 5353 (joined to 224.0.0.251 and ff02::fb
                                      on every interface); log UDP payloads to OUTFILE
  fw_peer.py tcp HOST PORT [TIMEOUT [SRCADDR]]
                                      exit 0 connected within TIMEOUT seconds
                                      (default 1.5), 2 refused, 3 timed out
  fw_peer.py mcast4 SRCADDR MSG       send MSG to 224.0.0.251:5353 from SRCADDR
  fw_peer.py mcast6 IFNAME MSG        send MSG to [ff02::fb%IFNAME]:5353
  fw_peer.py udp HOST PORT MSG        send a unicast datagram
  fw_peer.py dhcp6-server IFNAME ADDR serve one DHCPv6 lease of ADDR on IFNAME
                                      (Solicit/Advertise, Request/Reply), then
                                      exit; gives up after 15 s
  fw_peer.py dhcp6-client IFNAME      run that exchange from port 546; print the
                                      leased address; exit 0, or 3 on no answer
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


def tcp(host, port, timeout=1.5, source=None):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(float(timeout))
    if source:
        s.bind((source, 0))
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


# DHCPv6 (RFC 8415): message types and options used by the exchange
SOLICIT, ADVERTISE, REQUEST, REPLY = 1, 2, 3, 7
OPT_CLIENTID, OPT_SERVERID, OPT_IA_NA, OPT_IAADDR, OPT_ELAPSED = 1, 2, 3, 5, 8
ALL_DHCP = "ff02::1:2"


def _opt(code, data):
    return struct.pack("!HH", code, len(data)) + data


def _opts(data):
    out, i = {}, 0
    while i + 4 <= len(data):
        code, n = struct.unpack("!HH", data[i:i + 4])
        out[code] = data[i + 4:i + 4 + n]
        i += 4 + n
    return out


def _duid(seed):
    return struct.pack("!HH", 3, 1) + bytes([2, 0, 0, 0, 0, seed])     # DUID-LL


def dhcp6_server(ifname, lease):
    idx = socket.if_nametoindex(ifname)
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 547))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(socket.AF_INET6, ALL_DHCP) + struct.pack("@I", idx))
    print("ready", flush=True)
    deadline = time.monotonic() + 15
    sid = _opt(OPT_SERVERID, _duid(0x53))
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        data, peer = s.recvfrom(2048)
        kind, xid, opts = data[0], data[1:4], _opts(data[4:])
        if kind not in (SOLICIT, REQUEST) or OPT_CLIENTID not in opts or OPT_IA_NA not in opts:
            continue
        iaid = opts[OPT_IA_NA][:4]
        addr = _opt(OPT_IAADDR, socket.inet_pton(socket.AF_INET6, lease) + struct.pack("!II", 3600, 7200))
        ia = _opt(OPT_IA_NA, iaid + struct.pack("!II", 1800, 2880) + addr)
        answer = ADVERTISE if kind == SOLICIT else REPLY
        s.sendto(bytes([answer]) + xid + _opt(OPT_CLIENTID, opts[OPT_CLIENTID]) + sid + ia, peer)
        print(f"sent {answer} to {peer[0]}", flush=True)
        if answer == REPLY:
            return 0
    return 3


def dhcp6_client(ifname):
    idx = socket.if_nametoindex(ifname)
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
    s.bind(("::", 546))
    cid = _opt(OPT_CLIENTID, _duid(0x43))
    ia_req = _opt(OPT_IA_NA, b"\0\0\0\1" + struct.pack("!II", 0, 0))
    elapsed = _opt(OPT_ELAPSED, b"\0\0")

    def ask(kind, extra, want):
        xid = os.urandom(3)
        s.sendto(bytes([kind]) + xid + cid + elapsed + ia_req + extra, (ALL_DHCP, 547, 0, idx))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            data, peer = s.recvfrom(2048)
            if data[0] == want and data[1:4] == xid:
                return _opts(data[4:]), peer
        return None, None

    adv, peer = ask(SOLICIT, b"", ADVERTISE)
    if adv is None or OPT_SERVERID not in adv:
        print("no Advertise", file=sys.stderr)
        return 3
    rep, peer = ask(REQUEST, _opt(OPT_SERVERID, adv[OPT_SERVERID]), REPLY)
    if rep is None or OPT_IA_NA not in rep:
        print("no Reply", file=sys.stderr)
        return 3
    iaaddr = _opts(rep[OPT_IA_NA][12:]).get(OPT_IAADDR, b"")
    print(socket.inet_ntop(socket.AF_INET6, iaaddr[:16]), peer[0])
    return 0


def main():
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2])
    elif cmd == "tcp":
        sys.exit(tcp(*sys.argv[2:6]))
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
    elif cmd == "dhcp6-server":
        sys.exit(dhcp6_server(sys.argv[2], sys.argv[3]))
    elif cmd == "dhcp6-client":
        sys.exit(dhcp6_client(sys.argv[2]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
