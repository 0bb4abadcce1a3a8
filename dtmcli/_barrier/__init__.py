"""Private implementation of the sub-transaction barrier; the public face is :mod:`dtmcli.barrier`."""
