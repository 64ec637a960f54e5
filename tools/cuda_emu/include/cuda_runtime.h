#pragma once
#include "mmk_cuda_emu.h"
