#ifndef HYDRATION_CSYSTEMD_SHIM_H
#define HYDRATION_CSYSTEMD_SHIM_H
#include <systemd/sd-daemon.h>
#endif
