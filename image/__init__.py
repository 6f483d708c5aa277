"""The Thox appliance image builder: disk work around the Ansible roles, which make every
change to the root file system (`python3 -m image --help`; see image/README.md).

Modules: common (stages, commands, the app's pins and secret list), context (the Context
every stage is given), aptmirror, wheel, bootstrap, provision, scan, esp, disk, manifest,
qemu, and targets/amd64 and targets/jetson (the per-target stages)."""
