"""Fault injection shared by the provisioning and image tests."""

# Run on the box with the app's python: SIGKILL thox-api's main process and
# print (as JSON) the old and new PIDs and the seconds until /health answers
# again from a new process.
KILL_AND_WAIT = r'''
import json, subprocess, time, urllib.request
def main_pid():
    return int(subprocess.check_output(["systemctl", "show", "-p", "MainPID", "--value", "thox-api.service"]))
old = main_pid()
subprocess.check_call(["kill", "-9", str(old)])
t0 = time.monotonic()
while time.monotonic() - t0 < 60:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=1) as r:
            if r.status == 200 and main_pid() not in (0, old):
                break
    except OSError:
        pass
    time.sleep(0.05)
print(json.dumps({"old": old, "new": main_pid(), "seconds": round(time.monotonic() - t0, 2)}))
'''
