#pragma once
#include "mmk_cuda_emu_device.h"
