# CMake package config of an installed partialfc (cargo cinstall puts it in
# <prefix>/share/cmake/partialfc/). find_package(partialfc CONFIG) defines
#   partialfc::partialfc         the shared library (libpartialfc.so.0)
#   partialfc::partialfc_static  the static library with the system libraries it needs
# Both carry the include directory <prefix>/include/partialfc (partialfc.h, and partialfc.hpp,
# which needs C++17). Paths are found relative to this file, so the prefix can move.
# Loaded twice in one directory scope (find_package from two places), it defines nothing new.
if(TARGET partialfc::partialfc)
  return()
endif()

get_filename_component(_pfc_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(_pfc_include "${_pfc_prefix}/include/partialfc")
if(NOT EXISTS "${_pfc_include}/partialfc.h")
  set(${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
  set(${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE "partialfc.h is missing from ${_pfc_include}")
  return()
endif()

# cargo-c's libdir is lib, lib64 or Debian's lib/<multiarch>.
set(_pfc_libdirs "${_pfc_prefix}/lib" "${_pfc_prefix}/lib64")
if(CMAKE_LIBRARY_ARCHITECTURE)
  list(PREPEND _pfc_libdirs "${_pfc_prefix}/lib/${CMAKE_LIBRARY_ARCHITECTURE}")
endif()
find_library(PARTIALFC_SHARED_LIBRARY NAMES libpartialfc.so partialfc PATHS ${_pfc_libdirs} NO_DEFAULT_PATH)
find_library(PARTIALFC_STATIC_LIBRARY NAMES libpartialfc.a PATHS ${_pfc_libdirs} NO_DEFAULT_PATH)
if(NOT PARTIALFC_SHARED_LIBRARY)
  set(${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
  set(${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE "libpartialfc.so is missing from ${_pfc_libdirs}")
  return()
endif()

add_library(partialfc::partialfc SHARED IMPORTED)
set_target_properties(partialfc::partialfc PROPERTIES
  IMPORTED_LOCATION "${PARTIALFC_SHARED_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "${_pfc_include}")

if(PARTIALFC_STATIC_LIBRARY)
  include(CMakeFindDependencyMacro)
  find_dependency(Threads)
  add_library(partialfc::partialfc_static STATIC IMPORTED)
  # What the Rust standard library needs from the system when linked statically.
  set_target_properties(partialfc::partialfc_static PROPERTIES
    IMPORTED_LOCATION "${PARTIALFC_STATIC_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${_pfc_include}"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m;rt;util")
endif()

set(partialfc_INCLUDE_DIR "${_pfc_include}")
unset(_pfc_prefix)
unset(_pfc_include)
unset(_pfc_libdirs)
